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
import time

import torch


def _interleaved_min(fns: dict, repeats: int) -> dict:
    """Run each timed function once per round, alternating, and keep each one's fastest round: on a
    shared machine, alternating spreads other load evenly over the variants compared."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def measure(name: str, seq: int, batch: int, decode: int, repeats: int) -> dict:
    from graftlm import LoRAConfig, SSTConfig, attach_adapter, load_model
    from graftlm.adapters.sst_deliberation import generate_with_deliberation
    from graftlm.recipes.budget import lora_rank_for_budget

    sst_base, _ = load_model(name)
    lora_base, _ = load_model(name)
    config = sst_base.config
    ids = torch.randint(100, config.vocab_size - 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :32]

    sst = attach_adapter(sst_base, SSTConfig())
    graft = sst.grafts["default"]
    graft.set_blend(0.03, 1.0)
    blend, gates = graft.blend_unfolded.numel(), graft.gate_unfolded.numel()
    probe = graft.probe_weight.numel() + graft.probe_bias.numel()
    rank = lora_rank_for_budget(lora_base, blend + gates, ["v_proj"])
    lora = attach_adapter(lora_base, LoRAConfig(r=rank, target_modules=["v_proj"]))

    sst.train()
    lora.train()
    steps = _interleaved_min({"two_pass": lambda: _train_step(sst, ids), "lora": lambda: _train_step(lora, ids)},
                             repeats)
    sst.eval()
    lora.detach()

    def base_generate():
        lora_base.generate(input_ids=prompt, max_new_tokens=decode, min_new_tokens=decode, do_sample=False,
                           pad_token_id=0)

    decodes = _interleaved_min({
        "base": base_generate,
        "depth1": lambda: generate_with_deliberation(sst, prompt, max_new_tokens=decode, depth=1),
        "depth4": lambda: generate_with_deliberation(sst, prompt, max_new_tokens=decode, depth=4),
    }, repeats)
    return {
        "model": name, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "blend_params": blend, "gate_params": gates, "probe_buffers": probe,
        "train_tokens": batch * seq, "two_pass_step_s": round(steps["two_pass"], 3),
        "lora_same_budget_step_s": round(steps["lora"], 3), "lora_rank": rank,
        "two_pass_step_ratio": round(steps["two_pass"] / steps["lora"], 2),
        "base_decode_tok_s": round(decode / decodes["base"], 1),
        "sst_depth1_decode_tok_s": round(decode / decodes["depth1"], 1),
        "sst_depth4_decode_tok_s": round(decode / decodes["depth4"], 1),
        "depth1_ratio": round(decodes["base"] / decodes["depth1"], 2),
        "depth4_ratio": round(decodes["base"] / decodes["depth4"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--decode", type=int, default=16, help="new tokens per decode measurement")
    parser.add_argument("--repeats", type=int, default=4)
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
