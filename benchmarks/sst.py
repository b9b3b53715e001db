"""SST benchmark (issues 4 and 13): parameters, two-pass training cost, decode cost, with deliberation.

    python3 benchmarks/sst.py [--models smollm2-135m gemma-3-270m] [--seq 128] [--batch 4] [--decode 32]
                              [--repeats 5] [--json out/sst_bench.json]

Everything is measured side by side in one run on the same machine, alternating the variants compared
(each variant's fastest round is kept), and reported as ratios:
* trainable parameters of the blend (L x d), the gates (L) and the probe buffers on each checkpoint;
* training steps (forward + backward, batch x seq random tokens): SST alone (two passes) against a plain
  forward + backward of the same base with a LoRA of SST's budget on v_proj (the cheapest comparable step:
  the frozen base alone has nothing to backpropagate into), and SST + LoRA r=8 (two passes) against the
  same LoRA r=8 alone (the paper's pair);
* greedy decode time per token (a prefilled cache, then one-token steps, the prefill not timed): the base
  model without hooks against the trained-shape SST graft (blend open, every gate 1) at depth 1, both
  through the same loop; and end to end (``generate``-style prefill + decode) at depth 1 and depth 4
  through `generate_with_deliberation`, against the base's ``generate``.
Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _interleaved_min(fns: dict, repeats: int) -> dict:
    """Run each function once per round, alternating, and keep each one's fastest round. A function that
    returns a float reports its own duration (e.g. decode without the prefill); otherwise its call is timed.
    On a shared machine, alternating spreads other load evenly over the variants compared."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            reported = fn()
            elapsed = reported if isinstance(reported, float) else time.perf_counter() - started
            best[name] = min(best[name], elapsed)
    return best


def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


@torch.no_grad()
def _decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    """Prefill ``prompt`` into a cache, then time ``steps`` greedy one-token forwards; returns seconds."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return time.perf_counter() - started


def measure(name: str, seq: int, batch: int, decode: int, repeats: int) -> dict:
    from graftlm import LoRAConfig, SSTConfig, attach_adapter, load_model
    from graftlm.adapters.sst_deliberation import generate_with_deliberation
    from graftlm.recipes.budget import lora_rank_for_budget

    bases = {key: load_model(name)[0] for key in ("sst", "lora_budget", "sst_lora", "lora8", "plain")}
    config = bases["plain"].config
    ids = torch.randint(100, config.vocab_size - 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :32]

    sst = attach_adapter(bases["sst"], SSTConfig())
    graft = sst.grafts["default"]
    graft.set_blend(0.03, 1.0)
    blend, gates = graft.blend_unfolded.numel(), graft.gate_unfolded.numel()
    probe = graft.probe_weight.numel() + graft.probe_bias.numel()
    rank = lora_rank_for_budget(bases["lora_budget"], blend + gates, ["v_proj"])
    lora_budget = attach_adapter(bases["lora_budget"], LoRAConfig(r=rank, target_modules=["v_proj"]))
    sst_lora = attach_adapter(bases["sst_lora"], SSTConfig(lora_r=8))
    sst_lora.grafts["default"].set_blend(0.03, 1.0)
    lora8 = attach_adapter(bases["lora8"], LoRAConfig(r=8))

    models = (sst, lora_budget, sst_lora, lora8)
    for model in models:
        model.train()
    steps = _interleaved_min({"sst": lambda: _train_step(sst, ids), "lora_budget": lambda: _train_step(lora_budget, ids),
                              "sst_lora": lambda: _train_step(sst_lora, ids), "lora8": lambda: _train_step(lora8, ids)},
                             repeats)
    for model in models:
        model.eval()
    plain = bases["plain"]
    decodes = _interleaved_min({
        "base": lambda: _decode_seconds(plain, prompt, decode),
        "depth1": lambda: _decode_seconds(sst, prompt, decode),
    }, repeats)
    ends = _interleaved_min({
        "base_generate": lambda: plain.generate(input_ids=prompt, max_new_tokens=decode, min_new_tokens=decode,
                                                do_sample=False, pad_token_id=0),
        "deliberation1": lambda: generate_with_deliberation(sst, prompt, max_new_tokens=decode, depth=1),
        "deliberation4": lambda: generate_with_deliberation(sst, prompt, max_new_tokens=decode, depth=4),
    }, repeats)
    return {
        "model": name, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "blend_params": blend, "gate_params": gates, "probe_buffers": probe, "train_tokens": batch * seq,
        "sst_two_pass_step_s": round(steps["sst"], 3), "lora_budget_step_s": round(steps["lora_budget"], 3),
        "lora_budget_rank": rank, "sst_step_ratio": round(steps["sst"] / steps["lora_budget"], 2),
        "sst_lora8_two_pass_step_s": round(steps["sst_lora"], 3), "lora8_step_s": round(steps["lora8"], 3),
        "sst_lora8_step_ratio": round(steps["sst_lora"] / steps["lora8"], 2),
        "base_decode_ms_per_token": round(1e3 * decodes["base"] / decode, 2),
        "sst_depth1_decode_ms_per_token": round(1e3 * decodes["depth1"] / decode, 2),
        "depth1_decode_ratio": round(decodes["depth1"] / decodes["base"], 3),
        "base_generate_s": round(ends["base_generate"], 3),
        "deliberation1_s": round(ends["deliberation1"], 3), "deliberation4_s": round(ends["deliberation4"], 3),
        "deliberation1_ratio": round(ends["deliberation1"] / ends["base_generate"], 2),
        "deliberation4_ratio": round(ends["deliberation4"] / ends["base_generate"], 2),
    }


def table(rows: list[dict]) -> str:
    lines = [("| model | blend + gates | SST 2-pass step / LoRA same budget | SST+LoRA r8 2-pass step / LoRA r8 | "
             "decode ms/token base / SST d=1 (ratio) | generate base / deliberation d=1, d=4 (ratios) |"),
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['blend_params']:,} + {r['gate_params']} | {r['sst_two_pass_step_s']:.3f} s / "
            f"{r['lora_budget_step_s']:.3f} s = {r['sst_step_ratio']:.2f}x | {r['sst_lora8_two_pass_step_s']:.3f} s / "
            f"{r['lora8_step_s']:.3f} s = {r['sst_lora8_step_ratio']:.2f}x | {r['base_decode_ms_per_token']:.2f} / "
            f"{r['sst_depth1_decode_ms_per_token']:.2f} ({r['depth1_decode_ratio']:.3f}x) | {r['base_generate_s']:.3f} s"
            f" / {r['deliberation1_s']:.3f} s, {r['deliberation4_s']:.3f} s ({r['deliberation1_ratio']:.2f}x, "
            f"{r['deliberation4_ratio']:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--decode", type=int, default=32, help="new tokens per decode measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = [measure(name, args.seq, args.batch, args.decode, args.repeats) for name in args.models]
    print(json.dumps(rows, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
