"""``graftlm demo``: the main job, on an embedded real checkpoint, on a CPU.

Steps: load the checkpoint (converted once from GGUF, then cached), attach a graft, check that the fresh
graft leaves the base model's logits exactly unchanged, generate, save the adapter, reload it onto a fresh
copy of the base and check identical outputs, detach and check the base is bit-identical. Prints a short
table and writes ``report.json`` and ``report.md`` beside the adapter.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

PROMPT = "The three primary colours are"


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _greedy(model, tokenizer, ids, new_tokens):
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_demo(model_name: str = "smollm2-135m", out_dir: str | Path = "out/demo", quick: bool = False) -> dict:
    from graftlm import LoRAConfig, attach_adapter, load_model

    out_dir = Path(out_dir)
    new_tokens = 8 if quick else 24
    rows: list[tuple[str, str]] = []

    (model, tokenizer), load_s = _timed(lambda: load_model(model_name))
    rows.append(("load " + model_name, f"{load_s:.1f} s"))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    base_logits = _logits(model, ids)
    base_text = _greedy(model, tokenizer, ids, new_tokens)

    graft_model = attach_adapter(model, LoRAConfig(r=8))
    trainable, total = graft_model.get_nb_trainable_parameters()
    rows.append(("trainable / total params", f"{trainable:,} / {total:,}"))
    fresh_exact = torch.equal(_logits(graft_model, ids), base_logits)
    rows.append(("fresh graft == base logits", str(fresh_exact)))

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in graft_model.graft_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    grafted_logits = _logits(graft_model, ids)
    grafted_text = _greedy(graft_model, tokenizer, ids, new_tokens)

    adapter_dir = out_dir / "adapter"
    graft_model.save_pretrained(adapter_dir, overwrite=True)
    size_kb = sum(p.stat().st_size for p in adapter_dir.iterdir()) / 1024
    rows.append(("adapter saved", f"{adapter_dir} ({size_kb:.0f} KiB)"))

    fresh_base, _ = load_model(model_name)
    reloaded = attach_adapter(fresh_base, adapter_dir)
    reload_exact = torch.equal(_logits(reloaded, ids), grafted_logits)
    reload_text = _greedy(reloaded, tokenizer, ids, new_tokens)
    rows.append(("reloaded == saved logits", str(reload_exact)))
    rows.append(("reloaded == saved generation", str(reload_text == grafted_text)))

    detached = graft_model.detach()
    detach_exact = torch.equal(_logits(detached, ids), base_logits)
    rows.append(("detach == base logits (bit-exact)", str(detach_exact)))

    ok = fresh_exact and reload_exact and reload_text == grafted_text and detach_exact
    summary = {
        "model": model_name,
        "prompt": PROMPT,
        "base_generation": base_text,
        "grafted_generation": grafted_text,
        "rows": rows,
        "ok": ok,
    }
    _write_report(out_dir, summary)
    _print_table(summary)
    return summary


def _print_table(summary: dict) -> None:
    width = max(len(k) for k, _ in summary["rows"])
    print(f"\ngraftlm demo on {summary['model']}")
    print(f"prompt: {summary['prompt']!r}")
    print(f"  base:    {summary['base_generation']!r}")
    print(f"  grafted: {summary['grafted_generation']!r}")
    for key, value in summary["rows"]:
        print(f"  {key:<{width}}  {value}")
    print("  result: " + ("OK" if summary["ok"] else "FAILED"))


def _write_report(out_dir: Path, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# graftlm demo: {summary['model']}", "", "| step | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["rows"]]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
