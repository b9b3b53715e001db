"""Multi-process saving: under FSDP each process holds a shard of the graft tensors, so the adapter saved
must come from the gathered full state dict.

accelerate turns FSDP on only for GPU-like distributed types (its CPU processes are always MULTI_CPU, i.e.
DDP), so the recipes loop can't run under FSDP on this machine; torch's FSDP2 (``fully_shard``) does run
on CPU processes over gloo, and the test below shards a stacked GraftModel with it and gathers the state
dict the way ``accelerator.get_state_dict`` does under FSDP2. (FSDP1 crashes on CPU here.)
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from graft_fixtures import FFNBiasConfig, build_tiny_model
from safetensors.torch import load_file

from graftlm.adapters import LoRAConfig, attach_adapter
from graftlm.adapters.io import WEIGHTS_NAME
from graftlm.recipes.checkpoint import full_adapter_state
from graftlm.recipes.objective import TrainingObjective

WORKER = Path(__file__).with_name("fsdp_worker.py")


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{sub.relative_to(folder)}/{k}": v for sub in [folder, *folder.iterdir()] if (sub / WEIGHTS_NAME).exists()
            for k, v in load_file(sub / WEIGHTS_NAME).items()}


def stacked_model():
    model = attach_adapter(build_tiny_model("gemma3"), FFNBiasConfig())
    model = attach_adapter(model, LoRAConfig(r=2), adapter_name="lora")
    with torch.no_grad():
        for p in model.graft_parameters():
            p.add_(torch.randn(p.shape))
    return model


def test_the_loop_gathers_under_fsdp_and_saves_from_the_gathered_state(tmp_path):
    """`full_adapter_state` asks accelerate for the full state dict of the wrapped TrainingObjective under
    FSDP / DeepSpeed (its keys carry the ``graft_model.`` prefix) and hands back GraftModel keys."""
    model = stacked_model()
    objective = TrainingObjective(model)
    asked = []

    def get_state_dict(module):
        asked.append(module)
        return {k: v.clone() * 2 for k, v in module.state_dict().items()}  # "gathered": visibly not the live ones

    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        accelerator = SimpleNamespace(distributed_type=kind, get_state_dict=get_state_dict)
        assert full_adapter_state(accelerator, objective) is None
    assert asked == []
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, get_state_dict=get_state_dict)
    gathered = full_adapter_state(fsdp, objective)
    assert asked == [objective] and set(gathered) == set(model.state_dict())
    model.save_pretrained(tmp_path / "gathered", state_dict=gathered)
    model.save_pretrained(tmp_path / "live")
    live, from_gathered = saved_tensors(tmp_path / "live"), saved_tensors(tmp_path / "gathered")
    assert set(live) == set(from_gathered) and any(k.startswith("lora/lora.") for k in live)
    assert all(torch.equal(from_gathered[k], live[k] * 2) for k in live)


def test_a_state_dict_missing_the_graft_tensors_is_refused(tmp_path):
    model = stacked_model()
    partial = {k: v for k, v in model.state_dict().items() if "lora_B" not in k}
    with pytest.raises(ValueError, match=r"state_dict holds no tensors .*lora_B.* of adapter 'lora'"):
        model.save_pretrained(tmp_path / "adapter", state_dict=partial)
    assert not (tmp_path / "adapter").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_saves_the_whole_adapter(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for record in ranks:  # each process holds half of every graft tensor, and saving those is refused
        assert all(n == 32 for n in record["local_numel"].values()), record["local_numel"]
        assert "are shards (FSDP)" in record["live_save_error"] and "state_dict=state_dict" in record["live_save_error"]
    reference, gathered = saved_tensors(tmp_path / "reference"), saved_tensors(tmp_path / "gathered")
    assert set(gathered) == set(reference) and len(reference) > 2
    for key, value in reference.items():
        torch.testing.assert_close(gathered[key], value, rtol=1e-5, atol=1e-6)
    initial = saved_tensors(tmp_path / "initial")  # the step moved every tensor the test compares
    assert all(not torch.equal(initial[k], v) for k, v in reference.items() if "lora_A" not in k)
