"""One command that checks every graft on the GPU users train on (issue 17), and prints one table (+ JSON).

    python3 benchmarks/gpu_suite.py                          # CUDA, bf16, realistic sizes
    python3 benchmarks/gpu_suite.py --device cpu --quick     # the same at tiny sizes on a CPU (tests run it)

Sections, each row measured in this run (ratios are side by side, never against a remembered number):

* ``graft``, per embedded checkpoint (bf16) and graft (SST, Attractor, Echo parallel and replace, LoRA,
  range search): a fresh adapter reproduces the base's logits bit for bit (``exact``); with its
  parameters opened (gates 0.5, zero tensors ~ N(0, 0.02)) one training step (forward, backward, AdamW)
  in ms and tokens/s, and greedy decode in ms per token after a prefill, against the base's decode
  measured right after it with the graft disabled (``vs base`` = graft / base); host syncs per training step (forward + backward) and per decode step,
  counted with `graftlm.host_syncs.HostSyncCounter` on extra untimed steps (the base's own are in its
  row). Range search has no parameters: decode only.
* ``triton``: range search's Triton kernels through their public functions against the PyTorch
  references (max abs error, time): ``range_search_attention_triton`` vs ``range_search_attention_ref``,
  ``gathered_attention`` over every key vs SDPA, and ``candidates(backend="triton")`` vs the torch
  bounds. On a CPU they run in a subprocess under ``TRITON_INTERPRET=1``.
* ``attention``: one decode step of attention over 16k-128k cached keys (quick: 2k-4k): SDPA (flash on
  CUDA, bf16) vs range search (index + reservoir tau, budget 5 %, 4 sinks, 256-key window; Triton on
  CUDA, the torch path on a CPU, float32 there), with the output's relative error to dense, the index
  build time and the host syncs of one range-search step. Keys: clustered low-rank with noise, queries
  near a stored key (synthetic; ``benchmarks/range_search.py`` has real captured keys).
* ``recipe``: the shipped ``sst-smollm2-135m`` recipe for 200 steps in bf16 (quick: 3 steps).

Exit status 1 when a check fails or a case raises (the row says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import graftlm
from graftlm.host_syncs import HostSyncCounter
from graftlm.patches.cache_kwarg import with_cache
from graftlm.testing import generation_cache, open_grafts


@dataclasses.dataclass(frozen=True)
class Sizes:
    models: tuple[str, ...]
    train_batch: int
    train_tokens: int
    prefill: int
    decode_steps: int
    attention_keys: tuple[int, ...]
    triton_keys: int
    recipe_steps: int
    reps: int


FULL = Sizes(models=("smollm2-135m", "gemma-3-270m"), train_batch=8, train_tokens=512, prefill=2048,
             decode_steps=32, attention_keys=(16384, 32768, 65536, 131072), triton_keys=8192,
             recipe_steps=200, reps=5)
QUICK = Sizes(models=("smollm2-135m",), train_batch=2, train_tokens=32, prefill=40, decode_steps=3,
              attention_keys=(2048, 4096), triton_keys=300, recipe_steps=3, reps=1)


def graft_configs(sizes: Sizes) -> dict[str, graftlm.GraftConfig | None]:
    """The grafts the suite runs (None: the base alone)."""
    return {
        "base": None,
        "sst": graftlm.SSTConfig(),
        "attractor": graftlm.AttractorConfig(),
        "echo": graftlm.EchoConfig(),
        "echo_replace": graftlm.EchoConfig(mode="replace", window=64),
        "lora": graftlm.LoRAConfig(r=8),
        "range_search": graftlm.RangeSearchConfig(min_keys=min(1024, sizes.prefill // 2)),
    }


# -- helpers ----------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, device: str):
        self.device = device

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def ms(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3


def text_ids(tokenizer, batch: int, length: int, device: str) -> torch.Tensor:
    """[batch, length] token ids of real offline text (licences, Python docs), consecutive windows."""
    from graftlm.eval.needle import corpus_words

    words, _ = corpus_words(batch * length + 1000)
    ids = tokenizer(" ".join(words), return_tensors="pt").input_ids[0]
    need = batch * length
    ids = ids.repeat(math.ceil(need / ids.numel()))[:need]
    return ids.view(batch, length).to(device)


def syncs_text(counts: dict, per: int) -> str:
    total = sum(counts.values()) / per
    if not counts:
        return "0"
    kinds = ", ".join(f"{k} {v / per:g}" for k, v in sorted(counts.items()))
    return f"{total:g} ({kinds})"


def row(section: str, case: str, **values) -> dict:
    return {"section": section, "case": case, **values}


def guarded(section: str, case: str, measure) -> list[dict]:
    """The rows ``measure()`` returns, or one failed row naming the error: a case that raises is a row of
    the table, not the end of the run."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - reported in the table and in the exit status
        traceback.print_exc()
        return [row(section, case, ok=False, error=f"{type(err).__name__}: {err}"[:300])]


# -- section: grafts --------------------------------------------------------------------------------------
def forward_backward(model, batch) -> torch.Tensor:
    graft = next(iter(model.grafts.values()))
    terms = graft.training_loss(model, batch)
    loss = terms["loss"] if terms is not None else model(**batch).loss
    loss.backward()
    return loss.detach()


def train_step(model, optimizer, batch) -> torch.Tensor:
    loss = forward_backward(model, batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def decode_run(model, prompt: torch.Tensor, steps: int, clock: Clock, count_syncs: bool = False, cache=None):
    """Greedy decode after a prefill: (median ms per decoded token, syncs over two more steps or None).
    ``cache``: the generation cache to fill (default: the one the model's grafts supply)."""
    cache = generation_cache(model) if cache is None else cache
    with torch.no_grad():
        logits = model(input_ids=prompt, **with_cache({}, cache), use_cache=True).logits[:, -1:]
        token = model(input_ids=logits.argmax(-1), **with_cache({}, cache), use_cache=True).logits[:, -1:].argmax(-1)
        times = []  # after one untimed step (first-call allocations)
        for _ in range(steps):
            def one():
                nonlocal token
                token = model(input_ids=token, **with_cache({}, cache), use_cache=True).logits[:, -1:].argmax(-1)
            times.append(clock.ms(one))
        counts = None
        if count_syncs:
            with HostSyncCounter() as syncs:
                for _ in range(2):
                    token = model(input_ids=token, **with_cache({}, cache), use_cache=True).logits[:, -1:].argmax(-1)
            counts = dict(syncs.counts)
    return statistics.median(times), counts


def graft_case(base, config, name: str, sizes: Sizes, clock: Clock, data: dict) -> list[dict]:
    """One graft on ``base``: exactness when fresh, then training step and decode with it opened."""
    model = graftlm.attach_adapter(base, config)
    try:
        graft = model.grafts["default"]
        ramp = getattr(graft, "replace_ramp", None)
        if ramp is not None:
            graft.replace_ramp = 0.0  # Echo's replace mode is the base exactly only at ramp 0
        with torch.no_grad():
            exact = bool(torch.equal(model(input_ids=data["ids"][:2]).logits, data["base_logits"]))
        if ramp is not None:
            graft.replace_ramp = ramp
        open_grafts(model)
        values = {"exact": exact}
        parameters = list(model.graft_parameters())
        if parameters:
            values.update(train_values(model, parameters, data["batch"], sizes, clock))
        decode_ms, decode_syncs = decode_run(model, data["prompt"], sizes.decode_steps, clock, count_syncs=True)
        with model.disable_adapter():  # the base's decode measured next to the graft's, same machine state
            from transformers import DynamicCache

            base_ms, _ = decode_run(model, data["prompt"], sizes.decode_steps, clock,
                                    cache=DynamicCache(config=model.config))
        values.update(decode_ms=decode_ms, base_decode_ms=base_ms, decode_vs_base=decode_ms / base_ms,
                      decode_syncs=syncs_text(decode_syncs, 2))
        return [row("graft", name, ok=exact, **values)]
    finally:
        model.detach()


def train_values(model, parameters, batch, sizes: Sizes, clock: Clock) -> dict:
    """Median ms of a training step (forward, backward, AdamW), tokens/s, peak memory, syncs of a step."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    model.train()
    try:
        train_step(model, optimizer, batch)  # warm-up
        if clock.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = [clock.ms(lambda: train_step(model, optimizer, batch)) for _ in range(sizes.reps)]
        with HostSyncCounter() as syncs:  # forward + backward: AdamW's per-parameter step.item() reads
            forward_backward(model, batch)  # a CPU step counter (no device sync), which the counter can't tell
        optimizer.zero_grad(set_to_none=True)
    finally:
        model.eval()
    step_ms = statistics.median(times)
    values = {"train_ms": step_ms, "train_tok_s": batch["input_ids"].numel() / step_ms * 1e3,
              "train_syncs": syncs_text(dict(syncs.counts), 1)}
    if clock.device == "cuda":
        values["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return values


def graft_rows(name: str, sizes: Sizes, device: str, clock: Clock) -> list[dict]:
    from graftlm.models import load_model

    base, tokenizer = load_model(name, dtype=torch.bfloat16, device=device)
    ids = text_ids(tokenizer, sizes.train_batch, sizes.train_tokens, device)
    labels = ids.clone()
    labels[:, : sizes.train_tokens // 2] = -100  # a prompt / answer split, as the recipes train
    data = {"ids": ids, "prompt": text_ids(tokenizer, 1, sizes.prefill, device),
            "batch": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                      "use_cache": False}}
    with torch.no_grad():
        data["base_logits"] = base(input_ids=ids[:2]).logits
    base_ms, base_syncs = decode_run(base, data["prompt"], sizes.decode_steps, clock, True)
    rows = [row("graft", f"{name} base", ok=True, exact="-", decode_ms=base_ms, decode_syncs=syncs_text(base_syncs, 2))]
    for graft_name, config in graft_configs(sizes).items():
        if config is not None:
            case = f"{name} {graft_name}"
            rows += guarded("graft", case, lambda c=config, n=case: graft_case(base, c, n, sizes, clock, data))
    return rows


# -- section: triton kernels vs references -----------------------------------------------------------------
def structured_cache(n: int, h_kv: int, h_q: int, d: int, device: str, seed: int = 0):
    """Clustered low-rank keys with an offset and noise (closer to real heads than i.i.d. keys), values,
    and one decode query per head near a stored key: q [1, H_q, D], keys, values [1, H_kv, N, D]."""
    generator = torch.Generator().manual_seed(seed)
    rank, clusters = max(2, d // 8), 64
    basis = torch.randn(h_kv, rank, d, generator=generator)
    centres = 2.0 * torch.randn(h_kv, clusters, rank, generator=generator)
    pick = torch.randint(0, clusters, (n,), generator=generator)
    coefficients = centres[:, pick] + 0.5 * torch.randn(h_kv, n, rank, generator=generator)
    keys = coefficients @ basis / math.sqrt(rank) + 2.0 * torch.randn(h_kv, 1, d, generator=generator)
    keys = (keys + 0.3 * torch.randn(h_kv, n, d, generator=generator)).unsqueeze(0)
    values = torch.randn(1, h_kv, n, d, generator=generator)
    group = h_q // h_kv
    stored = torch.randint(0, n, (h_q,), generator=generator)
    q = keys[0, torch.arange(h_q) // group, stored] + 0.5 * torch.randn(h_q, d, generator=generator)
    return q.unsqueeze(0).to(device), keys.to(device), values.to(device)


SHAPES = {"smollm2-135m": (3, 9, 64), "gemma-3-270m": (1, 4, 256)}  # (H_kv, H_q, head_dim) per layer


def triton_case(shape: str, n: int, device: str, clock: Clock, reps: int) -> list[dict]:
    from graftlm.kernels.range_search import (
        KeyReservoir,
        RangeSearchIndex,
        exact_scores,
        gathered_attention,
        range_search_attention_ref,
        range_search_attention_triton,
    )

    h_kv, h_q, d = SHAPES[shape]
    case = f"{shape} {n} keys"
    q, keys, values = structured_cache(n, h_kv, h_q, d, device, seed=1)
    index = RangeSearchIndex.build(keys)
    reservoir = KeyReservoir(capacity=256, seed=0)
    reservoir.add(keys)
    tau = reservoir.threshold(q, 0.05)
    options = {"n_sink": 4, "n_window": 32}
    reference = range_search_attention_ref(q, keys, values, tau, **options)
    error = (range_search_attention_triton(q, keys, values, index, tau, **options) - reference).abs().max().item()
    ref_ms = min(clock.ms(lambda: range_search_attention_ref(q, keys, values, tau, **options)) for _ in range(reps))
    tri_ms = min(clock.ms(lambda: range_search_attention_triton(q, keys, values, index, tau, **options))
                 for _ in range(reps))
    all_ids = torch.arange(n, device=device).expand(h_q, n)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), keys, values, enable_gqa=True)
    dense_error = (gathered_attention(q, keys, values, all_ids) - sdpa.squeeze(2)).abs().max().item()
    top = exact_scores(q, keys).quantile(0.9, dim=-1)
    same = all(torch.equal(a, b) for a, b in zip(index.candidates(q, top), index.candidates(q, top, backend="triton")))
    return [
        row("triton", f"{case}: range_search_attention_triton vs ref", ok=error < 1e-4, max_abs_err=error,
            ms=tri_ms, reference_ms=ref_ms, ratio=tri_ms / ref_ms),
        row("triton", f"{case}: gathered_attention (all keys) vs SDPA", ok=dense_error < 1e-4,
            max_abs_err=dense_error),
        row("triton", f"{case}: candidates, triton bounds vs torch", ok=same, note="same pairs" if same else "differ"),
    ]


def triton_rows(sizes: Sizes, device: str, clock: Clock) -> list[dict]:
    rows = []
    for shape in SHAPES:
        rows += guarded("triton", f"{shape} {sizes.triton_keys} keys",
                        lambda s=shape: triton_case(s, sizes.triton_keys, device, clock, sizes.reps))
    return rows


def triton_rows_interpreted(sizes: Sizes) -> list[dict]:
    """The triton section in a subprocess under TRITON_INTERPRET=1 (it must be set before triton loads)."""
    from graftlm.kernels.range_search import triton_available

    if not triton_available():
        return [row("triton", "triton not importable", ok=True, note="skipped")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "triton.json"
        command = [sys.executable, __file__, "--device", "cpu", "--only", "triton", "--json", str(out)]
        if sizes is QUICK:
            command.append("--quick")
        env = dict(os.environ, TRITON_INTERPRET="1")
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        if not out.exists():
            return [row("triton", "interpreter run", ok=False, error=(done.stderr or done.stdout)[-300:])]
        rows = json.loads(out.read_text())["rows"]
    for item in rows:
        item["note"] = "TRITON_INTERPRET=1 (timings are the interpreter's)"
    return rows


# -- section: decode attention at long contexts ------------------------------------------------------------
def attention_case(shape: str, n: int, device: str, clock: Clock, reps: int) -> list[dict]:
    from graftlm.kernels.range_search import (
        KeyReservoir,
        RangeSearchIndex,
        range_search_attention_cpu,
        range_search_attention_triton,
        triton_available,
    )

    h_kv, h_q, d = SHAPES[shape]
    use_triton = device == "cuda" and triton_available()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # flash wants bf16
    q, keys, values = (t.to(dtype) for t in structured_cache(n, h_kv, h_q, d, device, seed=n))
    start = time.perf_counter()
    index = RangeSearchIndex.build(keys)
    clock.sync()
    build_s = time.perf_counter() - start
    reservoir = KeyReservoir(capacity=1024, seed=0)
    reservoir.add(keys)
    attend = range_search_attention_triton if use_triton else range_search_attention_cpu

    def sparse():
        return attend(q, keys, values, index, reservoir.threshold(q, 0.05), n_sink=4, n_window=256)

    def dense():
        q4 = q.unsqueeze(2)
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)
        return torch.nn.functional.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)

    sparse(), dense()
    dense_ms, sparse_ms = [], []
    for _ in range(max(3, reps)):  # interleaved, so both see the same machine load
        dense_ms.append(clock.ms(dense))
        sparse_ms.append(clock.ms(sparse))
    reference = dense().squeeze(2).float()
    error = ((sparse().float() - reference).norm() / reference.norm()).item()
    with HostSyncCounter() as syncs:
        sparse()
    return [row("attention", f"{shape} {n // 1024}k keys", ok=True, sdpa_ms=min(dense_ms),
                range_search_ms=min(sparse_ms), ratio=min(sparse_ms) / min(dense_ms), rel_err=error,
                build_s=build_s, backend="triton" if use_triton else "torch",
                decode_syncs=syncs_text(dict(syncs.counts), 1))]


def attention_rows(sizes: Sizes, device: str, clock: Clock) -> list[dict]:
    rows = []
    for shape in SHAPES:
        for n in sizes.attention_keys:
            rows += guarded("attention", f"{shape} {n // 1024}k keys",
                            lambda s=shape, n=n: attention_case(s, n, device, clock, sizes.reps))
    return rows


# -- section: a recipe run -----------------------------------------------------------------------------------
def recipe_rows(sizes: Sizes) -> list[dict]:
    from graftlm.recipes import load_recipe, train

    case = f"sst-smollm2-135m, {sizes.recipe_steps} steps"

    def run() -> list[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            overrides = ["--train.steps", str(sizes.recipe_steps), "--model.dtype", "bfloat16",
                         "--output_dir", tmp, "--train.checkpoint_every", "0", "--train.progress_bar", "false",
                         "--train.log_every", "10"]
            if sizes is QUICK:
                overrides += ["--data.n_train", "16", "--data.n_eval", "8", "--train.batch_size", "4",
                              "--train.eval_every", "0", "--train.warmup_steps", "1"]
            summary = train(load_recipe("sst-smollm2-135m", overrides)).summary
        return [row("recipe", case, ok=math.isfinite(summary["final_loss"]), wall_s=summary["wall_time_s"],
                    train_tok_s=summary["tokens_per_s"], final_loss=summary["final_loss"],
                    eval_loss=summary["final_eval_loss"],
                    note=f"{summary['device']}, mixed precision {summary['mixed_precision']}")]

    return guarded("recipe", case, run)


# -- the table -------------------------------------------------------------------------------------------
COLUMNS = [  # (key, header, format)
    ("exact", "exact", "{}"), ("train_ms", "train ms", "{:.1f}"), ("train_tok_s", "train tok/s", "{:.0f}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"), ("train_syncs", "syncs/train step", "{}"),
    ("decode_ms", "decode ms/tok", "{:.2f}"), ("base_decode_ms", "base ms/tok", "{:.2f}"),
    ("decode_vs_base", "vs base", "{:.2f}x"),
    ("decode_syncs", "syncs/decode step", "{}"),
    ("max_abs_err", "max abs err", "{:.1e}"), ("ms", "ms", "{:.3f}"), ("reference_ms", "ref ms", "{:.3f}"),
    ("sdpa_ms", "sdpa ms", "{:.3f}"), ("range_search_ms", "range ms", "{:.3f}"), ("ratio", "ratio", "{:.2f}x"),
    ("rel_err", "rel err", "{:.1e}"), ("build_s", "build s", "{:.2f}"),
    ("wall_s", "wall s", "{:.1f}"), ("final_loss", "loss", "{:.3f}"), ("eval_loss", "eval loss", "{:.3f}"),
]


def format_table(rows: list[dict]) -> str:
    lines = []
    for section in dict.fromkeys(r["section"] for r in rows):
        items = [r for r in rows if r["section"] == section]
        columns = [c for c in COLUMNS if any(c[0] in r for r in items)]
        header = ["case", "ok"] + [c[1] for c in columns] + ["note"]
        lines.append(f"\n[{section}]")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in items:
            cells = [r["case"], "yes" if r.get("ok", True) else "NO"]
            for key, _, fmt in columns:
                value = r.get(key)
                cells.append("" if value is None else (fmt.format(value) if not isinstance(value, str) else value))
            cells.append(r.get("error") or r.get("note") or r.get("backend") or "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (about a minute on a CPU)")
    parser.add_argument("--only", nargs="*", choices=["graft", "triton", "attention", "recipe"], default=None)
    parser.add_argument("--json", default=None, help="write the rows here (default out/gpu_suite/DEVICE.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --device cpu (and --quick)")
    sizes = QUICK if args.quick else FULL
    sections = args.only or ["graft", "triton", "attention", "recipe"]
    clock = Clock(args.device)
    started = time.perf_counter()
    rows: list[dict] = []
    if "graft" in sections:
        for name in sizes.models:
            rows += graft_rows(name, sizes, args.device, clock)
    if "triton" in sections:
        interpret = args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"
        rows += triton_rows_interpreted(sizes) if interpret else triton_rows(sizes, args.device, clock)
    if "attention" in sections:
        rows += attention_rows(sizes, args.device, clock)
    if "recipe" in sections:
        rows += recipe_rows(sizes)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"device": device_name, "quick": args.quick, "torch": torch.__version__,
              "seconds": time.perf_counter() - started, "sizes": dataclasses.asdict(sizes), "rows": rows}
    path = Path(args.json or f"out/gpu_suite/{args.device}{'-quick' if args.quick else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_suite on {device_name} ({'quick' if args.quick else 'full'} sizes, bf16), "
          f"{report['seconds']:.0f} s; JSON: {path}")
    print(format_table(rows))
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
