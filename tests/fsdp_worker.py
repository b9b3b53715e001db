"""Run by torch.distributed.run in test_fsdp_save.py: FSDP2 over gloo on a CPU, one training step, then save.

Every rank trains a sharded copy of the same stacked GraftModel on the same batch; rank 0 also trains an
unsharded copy as the reference. The adapter saved from the live (sharded) grafts is refused; the adapter
saved from the gathered full state dict (what ``accelerator.get_state_dict`` returns under FSDP2) is
written by rank 0 beside the reference.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch
import torch.distributed as dist
from graft_fixtures import FFNBiasConfig, build_tiny_model

from graftlm.adapters import LoRAConfig, attach_adapter

IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 120, 33, 8, 61, 14], [5, 9, 1, 44, 2, 90, 17, 3, 3, 28, 100]])


def stacked_model():
    torch.manual_seed(0)
    model = attach_adapter(build_tiny_model("llama"), FFNBiasConfig())
    model = attach_adapter(model, LoRAConfig(r=2), adapter_name="lora")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.graft_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.train()


def one_step(model):
    optimizer = torch.optim.SGD(list(model.graft_parameters()), lr=0.5)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()


def main(out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        stacked_model().save_pretrained(out / "initial")
        reference = stacked_model()
        one_step(reference)
        reference.save_pretrained(out / "reference")
    model = stacked_model()
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    one_step(model)
    record = {"rank": rank, "world_size": dist.get_world_size()}
    try:
        model.save_pretrained(out / f"live-{rank}")
    except ValueError as err:
        record["live_save_error"] = str(err)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    gathered = get_model_state_dict(model, options=options)  # a collective: every rank calls it
    local = model.grafts["default"].adapter_state_dict()
    record["local_numel"] = {k: v.to_local().numel() for k, v in local.items()}
    if rank == 0:
        model.save_pretrained(out / "gathered", state_dict=gathered)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
