"""Which attention layers are least replaceable by a local window (issue 15, criterion 1): measured, forward only.

    python3 benchmarks/echo_layer_choice.py [--model smollm2-135m] [--block-length 2048] [--blocks 6]
                                            [--window 64] [--keep-sizes 2 3 4] [--candidates all|full]
                                            [--out out/echo_layer_choice]

On held-out real text (the licence texts of /usr/share/common-licenses, Jules Verne's "In the Year 2889"
shipped by reasoning_gym, and the sources of Python's ``email``, ``http``, ``urllib`` and ``asyncio``
packages: none of it in the Echo recipe's training text, Python's top-level standard-library modules),
cut into ``--blocks`` blocks of ``--block-length`` tokens spread evenly over the packed text:

1. **One layer at a time**: layer i's attention replaced by a fresh replace-mode Echo graft (window
   ``--window``, ramp 1, W_o = 0: exactly the frozen q/k/v/o restricted to the last ``window`` tokens, Echo
   silent) and the held-out NLL measured; the rise over the base is that layer's cost of losing its long
   context.
2. **Attention mass beyond the window** per layer: the base's softmax weight each query puts on keys at
   distance >= window (mean over heads and over the queries that have such keys), from one eager forward.
3. **All but the kept layers** replaced by the window, for the ``k`` costliest layers of (1) kept, for each
   ``k`` in ``--keep-sizes``, against ``k`` evenly spaced layers kept (a choice not made by measurement).

``--candidates full`` restricts all three to the full-attention layers (Gemma 3: its 3 global layers; its
sliding layers already hold a bounded cache), and a keep size of 0 replaces every candidate.

Writes ``layer_choice.json`` and ``layer_choice.md`` under ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from graftlm.adapters import attach_adapter
from graftlm.adapters.echo import EchoConfig
from graftlm.compare.evaluation import block_nll, build_eval_set
from graftlm.compare.spec import EvalSpec
from graftlm.recipes.config import DataSection

PYTHON_LIB = "/root/.pyenv/versions/3.11.7/lib/python3.11"
LICENSES = ["Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2", "GPL-3",
            "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0"]  # the files, not their symlinks
HELD_OUT_FILES = ([f"/usr/share/common-licenses/{name}" for name in LICENSES]
                  + [f"{PYTHON_LIB}/site-packages/reasoning_gym/data/in_the_year_2889.txt",
                     f"{PYTHON_LIB}/email/*.py", f"{PYTHON_LIB}/http/*.py", f"{PYTHON_LIB}/urllib/*.py",
                     f"{PYTHON_LIB}/asyncio/*.py"])


def held_out_text() -> DataSection:
    """The held-out text source: whole files (``sample_by: document``), read by the datasets text builder."""
    return DataSection(dataset="text", data_files=HELD_OUT_FILES, text_field="text",
                       load_kwargs={"sample_by": "document"})


def evenly_spaced_blocks(tokenizer, length: int, count: int) -> list[list[int]]:
    every = build_eval_set(EvalSpec(name="held-out text", perplexity=held_out_text(), n=10**6, max_length=length),
                           tokenizer).blocks
    if len(every) < count:
        raise SystemExit(f"the held-out text gives {len(every)} blocks of {length} tokens, fewer than {count}")
    return [every[round(i * (len(every) - 1) / max(1, count - 1))] for i in range(count)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def replaced_nll(model, blocks, layers: list[int], window: int, sinks: int = 0) -> list[float]:
    """Per-block NLL with ``layers``' attention cut to the window (and ``sinks`` first tokens) by a fresh
    replace-mode Echo graft."""
    grafted = attach_adapter(model, EchoConfig(mode="replace", target_layers=layers, window=window,
                                               chunk_size=window, sink_tokens=sinks))
    try:
        return block_nll(grafted, blocks)
    finally:
        grafted.detach()


@torch.no_grad()
def candidate_layers(model, which: str) -> list[int]:
    """The layers that may be replaced: every layer (``all``) or the full-attention ones (``full``)."""
    from graftlm.patches import get_patch

    types = get_patch(model).layer_types(model)
    return [i for i, kind in enumerate(types) if which == "all" or kind == "full_attention"]


def mass_beyond_window(model, blocks, window: int) -> list[float]:
    """Per layer, the mean softmax weight on keys at distance >= window (queries at positions >= window)."""
    from graftlm.patches import get_patch

    patch = get_patch(model)
    layers = patch.decoder_layers(model)
    sums = [0.0] * len(layers)
    hooks = []

    def make_hook(index: int):
        def hook(module, args, output):
            weights = output[1]  # [B, H, q, k], eager attention
            length = weights.shape[-1]
            position = torch.arange(length)
            far = (position[:, None] - position[None, :]) >= window  # [q, k]
            mass = (weights.float() * far).sum(-1)[..., window:]  # [B, H, q - window]
            sums[index] += float(mass.mean())
            return output[0], None

        return hook

    previous = model.config._attn_implementation
    patch.set_attention_implementation(model, "eager")
    try:
        for index, layer in enumerate(layers):
            hooks.append(patch.attention(layer).register_forward_hook(make_hook(index)))
        for block in blocks:
            model(input_ids=torch.tensor([block]))
    finally:
        for hook in hooks:
            hook.remove()
        patch.set_attention_implementation(model, previous)
    return [s / len(blocks) for s in sums]


def evenly_spaced(layers: int, count: int) -> list[int]:
    return [round((i + 0.5) * layers / count - 0.5) for i in range(count)]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [(f"### Which layers to keep: {s['model']}, window {s['window']}, {s['blocks']} held-out blocks of "
             f"{s['block_length']} tokens"),
             "",
             (f"Base NLL {report['base_nll']:.4f} (perplexity {math.exp(report['base_nll']):.2f}). One layer's "
             "attention at a time cut to the window (fresh replace-mode Echo: the window alone):"),
             "",
             "| layer | NLL | rise over base | rise, min-max over blocks | attention mass beyond window |",
             "|---:|---:|---:|---:|---:|"]
    for row in report["layers"]:
        lines.append(f"| {row['layer']} | {row['nll']:.4f} | {row['rise']:+.4f} | {row['rise_min']:+.4f} .. "
                     f"{row['rise_max']:+.4f} | {row['mass_beyond_window']:.3f} |")
    lines += ["", (f"Ranked by rise: {', '.join(str(i) for i in report['ranking'])}. "
              f"Spearman correlation of the rise with the attention mass beyond the window: "
              f"{report['rank_correlation']:.2f}."),
              "", f"All candidate layers ({', '.join(map(str, report['candidates']))}) but the kept ones cut to the window:", "",
              "| kept | chosen by | NLL | perplexity | rise over base |", "|---|---|---:|---:|---:|"]
    for row in report["keep"]:
        lines.append(f"| {row['kept']} | {row['chosen_by']} | {row['nll']:.4f} | {math.exp(row['nll']):.2f} | "
                     f"{row['nll'] - report['base_nll']:+.4f} |")
    lines += ["", f"{s['threads']} threads, {report['wall_s']:.0f} s. Command: `{s['command']}`"]
    return "\n".join(lines) + "\n"


def spearman(a: list[float], b: list[float]) -> float:
    rank = lambda x: torch.tensor(x).argsort().argsort().double()
    ra, rb = rank(a), rank(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--block-length", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--keep-sizes", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--sink-tokens", type=int, default=0,
                        help="first tokens the window also attends (EchoConfig.sink_tokens; 0: the window alone)")
    parser.add_argument("--candidates", default="all", choices=["all", "full"],
                        help="the layers that may be replaced: every layer, or only the full-attention ones (Gemma 3: "
                             "its sliding layers already hold a bounded cache)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/echo_layer_choice")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from graftlm.models import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    model.eval()
    blocks = evenly_spaced_blocks(tokenizer, args.block_length, args.blocks)
    base = block_nll(model, blocks)
    base_nll = mean(base)
    mass = mass_beyond_window(model, blocks, args.window)
    candidates = candidate_layers(model, args.candidates)
    rows = []
    for layer in candidates:
        nll = replaced_nll(model, blocks, [layer], args.window, args.sink_tokens)
        rises = [a - b for a, b in zip(nll, base)]
        rows.append({"layer": layer, "nll": mean(nll), "rise": mean(rises), "rise_min": min(rises),
                     "rise_max": max(rises), "block_nll": nll, "mass_beyond_window": mass[layer]})
        print(f"layer {layer}: rise {mean(rises):+.4f}, mass beyond window {mass[layer]:.3f}", flush=True)
    ranking = [r["layer"] for r in sorted(rows, key=lambda r: -r["rise"])]
    keep, tried = [], set()
    for size in args.keep_sizes:
        spaced = [candidates[i] for i in evenly_spaced(len(candidates), size)]
        for chosen_by, kept in (("measured rise", sorted(ranking[:size])), ("evenly spaced", spaced)):
            if tuple(kept) in tried:  # e.g. keeping none, or all of a few candidates
                continue
            tried.add(tuple(kept))
            nll = replaced_nll(model, blocks, [i for i in candidates if i not in kept], args.window,
                               args.sink_tokens)
            keep.append({"kept": kept, "chosen_by": chosen_by, "nll": mean(nll), "block_nll": nll})
            print(f"keep {kept} ({chosen_by}): NLL {mean(nll):.4f}", flush=True)
    report = {"settings": {**vars(args), "command": "python3 benchmarks/echo_layer_choice.py "
                           f"--model {args.model} --block-length {args.block_length} --blocks {args.blocks} "
                           f"--window {args.window} --keep-sizes {' '.join(map(str, args.keep_sizes))} "
                           f"--candidates {args.candidates} --sink-tokens {args.sink_tokens}",
                           "held_out_files": HELD_OUT_FILES, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
              "base_nll": base_nll, "base_block_nll": base, "layers": rows, "ranking": ranking,
              "candidates": candidates,
              "rank_correlation": spearman([r["rise"] for r in rows], [mass[i] for i in candidates]), "keep": keep,
              "wall_s": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_choice.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "layer_choice.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
