"""Host syncs per decode step and per training step of every graft, on tiny random models (issue 17).

    python3 benchmarks/host_syncs.py [--json PATH]

Counted with `graftlm.host_syncs.HostSyncCounter` (torch-function level; inside backward passes at the
ATen level, ``backward_*``) on tiny Llama (2 layers) and Gemma 3 (3 layers) from the tests' fixtures,
each graft's parameters opened (gates 0.5, zero tensors ~ N(0, 0.02)):

* decode step: mean over 4 one-token forwards with the graft's cache after a 40-token prefill, without
  and with a 2-D attention mask (``generate`` passes one);
* training step: forward + backward of the graft's training loss (else the LM loss) on a 2 x 48 batch,
  all real tokens, and with the second row right-padded by 7 (as the recipes' collator pads).

transformers' own mask building makes the base's syncs (LoRA adds none: its row is the base's). The
exact counts are asserted in ``tests/test_host_syncs_grafts.py``. Prints one table per model, then JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from graft_fixtures import build_tiny_model, open_grafts

import graftlm
from graftlm.host_syncs import HostSyncCounter
from graftlm.testing import count_decode_syncs

GRAFTS = {
    "SST": lambda: graftlm.SSTConfig(),
    "Attractor": lambda: graftlm.AttractorConfig(),
    "Echo parallel": lambda: graftlm.EchoConfig(),
    "Echo replace": lambda: graftlm.EchoConfig(mode="replace", window=8),
    "Echo replace + distill": lambda: graftlm.EchoConfig(mode="replace", window=8, distill_weight=1.0),
    "LoRA (= base)": lambda: graftlm.LoRAConfig(),
    "range search": lambda: graftlm.RangeSearchConfig(min_keys=4, window=4, n_sink=1),
}
STEPS = 4


def decode_counts(model, with_mask: bool) -> dict[str, float]:
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    counts, _ = count_decode_syncs(model, ids, STEPS, with_mask)
    return {k: v / STEPS for k, v in sorted(counts.items())}


def training_counts(model, padded: bool) -> dict[str, float]:
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, -7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    model.train()
    graft = next(iter(model.grafts.values()))
    with HostSyncCounter() as syncs:
        terms = graft.training_loss(model, batch)
        (terms["loss"] if terms is not None else model(**batch).loss).backward()
    model.eval()
    return dict(sorted(syncs.counts.items()))


def cell(counts: dict[str, float] | None) -> str:
    if counts is None:
        return "-"
    if not counts:
        return "0"
    return f"{sum(counts.values()):g} (" + ", ".join(f"{k} {v:g}" for k, v in counts.items()) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    columns = {"decode step": lambda m: decode_counts(m, False), "decode step, mask": lambda m: decode_counts(m, True),
               "training step": lambda m: training_counts(m, False),
               "training step, right-padded": lambda m: training_counts(m, True)}
    report = {}
    for family in ("llama", "gemma3"):
        for name, config in GRAFTS.items():
            row = {}
            for column, measure in columns.items():
                decode = column.startswith("decode")
                if (decode and "distill" in name) or (not decode and name == "range search"):
                    row[column] = None  # distillation only trains; range search has nothing to train
                    continue
                row[column] = measure(open_grafts(graftlm.attach_adapter(build_tiny_model(family), config())))
            report[f"{family} {name}"] = row
    for family in ("llama", "gemma3"):
        print(f"\n{family}: host syncs per step")
        print("| graft | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name in GRAFTS:
            print(f"| {name} | " + " | ".join(cell(report[f'{family} {name}'][c]) for c in columns) + " |")
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
