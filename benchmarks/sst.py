"""SST benchmark (issue 4, part 7): parameters, two-pass training cost, decode speed with deliberation.

    python3 benchmarks/sst.py [--models smollm2-135m gemma-3-270m] [--seq 128] [--batch 4] [--decode 16]

Everything is measured side by side in one run on the same machine:
* trainable parameters of the blend (L x d), the gates (L) and the probe buffers on each checkpoint;
* a two-pass training step (pass 1 no grad + pass 2 with grad + backward) as a ratio of a plain
  forward + backward of the same frozen model with a LoRA of the same budget (the cheapest comparable
  trainable step: the frozen base alone has nothing to backpropagate into);
* greedy decode tokens/s with the graft at deliberation depth 1 and 4, as a ratio of the base's.
Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) if repeats < 3 else statistics.median(times)


def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def measure(name: str, seq: int, batch: int, decode: int, repeats: int) -> dict:
    from graftlm import LoRAConfig, SSTConfig, attach_adapter, load_model
    from graftlm.adapters.sst_deliberation import generate_with_deliberation
    from graftlm.recipes.budget import lora_rank_for_budget

    model, _ = load_model(name)
    config = model.config
    ids = torch.randint(100, config.vocab_size - 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :32]

    base_decode = _best(lambda: model.generate(input_ids=prompt, max_new_tokens=decode, min_new_tokens=decode,
                                               do_sample=False, pad_token_id=0), repeats)

    sst = attach_adapter(model, SSTConfig())
    graft = sst.grafts["default"]
    graft.set_blend(0.03, 1.0)
    blend = graft.blend_raw.numel()
    gates = graft.gate.numel()
    probe = graft.probe_weight.numel() + graft.probe_bias.numel()
    sst.train()
    _train_step(sst, ids)
    two_pass = _best(lambda: _train_step(sst, ids), repeats)
    sst.eval()
    depth = {}
    for d in (1, 4):
        depth[d] = _best(lambda: generate_with_deliberation(sst, prompt, max_new_tokens=decode, depth=d), repeats)
    base = sst.detach()

    rank = lora_rank_for_budget(base, blend + gates, ["v_proj"])
    lora = attach_adapter(base, LoRAConfig(r=rank, target_modules=["v_proj"]))
    lora.train()
    _train_step(lora, ids)
    plain = _best(lambda: _train_step(lora, ids), repeats)
    lora.detach()
    return {
        "model": name, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "blend_params": blend, "gate_params": gates, "probe_buffers": probe,
        "train_tokens": batch * seq, "two_pass_step_s": round(two_pass, 3),
        "lora_same_budget_step_s": round(plain, 3), "lora_rank": rank,
        "two_pass_step_ratio": round(two_pass / plain, 2),
        "base_decode_tok_s": round(decode / base_decode, 1),
        "sst_depth1_decode_tok_s": round(decode / depth[1], 1),
        "sst_depth4_decode_tok_s": round(decode / depth[4], 1),
        "depth1_ratio": round(base_decode / depth[1], 2),
        "depth4_ratio": round(base_decode / depth[4], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--decode", type=int, default=16, help="new tokens per decode measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [measure(name, args.seq, args.batch, args.decode, args.repeats) for name in args.models]
    print(json.dumps(rows, indent=2))
    print(f"\n{'model':14s} {'blend':>7s} {'gates':>5s} {'probe':>6s} {'2-pass step':>12s} {'LoRA step':>10s} "
          f"{'ratio':>6s} {'base tok/s':>10s} {'d=1 tok/s':>10s} {'d=4 tok/s':>10s} {'d1/base':>8s} {'d4/base':>8s}")
    for r in rows:
        print(f"{r['model']:14s} {r['blend_params']:>7,} {r['gate_params']:>5} {r['probe_buffers']:>6,} "
              f"{r['two_pass_step_s']:>11.3f}s {r['lora_same_budget_step_s']:>9.3f}s {r['two_pass_step_ratio']:>6.2f} "
              f"{r['base_decode_tok_s']:>10.1f} {r['sst_depth1_decode_tok_s']:>10.1f} "
              f"{r['sst_depth4_decode_tok_s']:>10.1f} {r['depth1_ratio']:>8.2f} {r['depth4_ratio']:>8.2f}")


if __name__ == "__main__":
    main()
