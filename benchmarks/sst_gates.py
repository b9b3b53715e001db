"""Per-layer gate, blend and gradient statistics of SST training runs, read from their run logs (issue 13:
the evidence that no grafted layer stops learning).

    python3 benchmarks/sst_gates.py RUN_DIR_OR_TRAIN_LOG [...] [--md out/sst_gates.md]

Each ``train_log.jsonl`` line holds, per grafted layer l, the means over the logged window of
``sst_gate/L<l>`` (the gate g_l), ``sst_blend/L<l>`` (mean c_l = g_l a_l) and ``sst_grad/L<l>`` (the norm of
the gradient of the layer's gate and blend coordinates; the first step's is 0: nothing was
backpropagated before it). Prints one table per log: the gate at the first, middle and last logged
step, the last mean c, and the smallest and last windowed gradient norm of every layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    log = path / "run" / "train_log.jsonl" if (path / "run").is_dir() else path
    log = log / "train_log.jsonl" if log.is_dir() else log
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def layer_table(records: list[dict]) -> dict:
    layers = sorted(int(k.split("/L")[1]) for k in records[0] if k.startswith("sst_gate/L"))
    if not layers:
        raise SystemExit("no sst_gate/L<l> entries in this log: not an SST run of this version")
    middle = records[len(records) // 2]
    rows = []
    for layer in layers:
        grads = [r[f"sst_grad/L{layer}"] for r in records]
        rows.append({"layer": layer, "gate_first": records[0][f"sst_gate/L{layer}"],
                     "gate_middle": middle[f"sst_gate/L{layer}"], "gate_last": records[-1][f"sst_gate/L{layer}"],
                     "mean_c_last": records[-1][f"sst_blend/L{layer}"], "grad_min": min(grads), "grad_last": grads[-1]})
    return {"steps": [records[0]["step"], middle["step"], records[-1]["step"]], "rows": rows,
            "smallest_grad": min(r["grad_min"] for r in rows),
            "layers_with_zero_grad_window": sum(r["grad_min"] == 0 for r in rows)}


def markdown(name: str, table: dict) -> str:
    first, middle, last = table["steps"]
    lines = [f"### {name}", "",
             (f"| layer | gate @ step {first} | gate @ {middle} | gate @ {last} | mean c @ {last} | smallest windowed "
             f"grad norm | grad norm @ {last} |"), "|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['layer']} | {r['gate_first']:.3f} | {r['gate_middle']:.3f} | {r['gate_last']:.3f} | "
                     f"{r['mean_c_last']:.4f} | {r['grad_min']:.2e} | {r['grad_last']:.2e} |")
    lines += ["", (f"Smallest windowed gradient norm over every layer and window: {table['smallest_grad']:.2e}; "
                  f"layers with a zero-gradient window: {table['layers_with_zero_grad_window']}."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="train_log.jsonl files or run directories")
    parser.add_argument("--md", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    text = "\n".join(markdown(str(path), layer_table(read_log(path))) for path in args.logs)
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)


if __name__ == "__main__":
    main()
