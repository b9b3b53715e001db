"""Echo recall statistics in float32 vs float64 on real hidden states (issue 17; the dtype policy).

    python3 benchmarks/echo_stats_dtype.py [--tokens 32768] [--layers 3,15,27] [--hidden PATH]

1. Captures the attention inputs (``input_layernorm`` outputs) of SmolLM2-135M at a few layers over
   ``--tokens`` tokens of real offline text (licence texts, Python docs; 2048-token windows), or reads
   them from ``--hidden`` (written on the first run).
2. Projects them with a fresh Echo branch (SmolLM2's 9 heads, r = 16, P = 64, seeded default init) and
   runs the operator (K = 2, L = 64) with float64 statistics (the reference) and float32 statistics:
   the chunked path (training, prefill) and the token-by-token decode path, with and without the Kahan
   compensation of G and M. Reports the relative output error ||y32 - y64|| / ||y64|| over positions
   (median, 99th percentile, max) at several lengths.
3. Recall: N = 8 facts (random unit keys in an 8-dimensional subspace, random values) stored first, then
   the real keys and values as distractors, projected onto the other 8 dimensions so that in exact
   arithmetic they do not disturb the facts (ridge recall, K = 0); then each fact key as a query. Top-1
   recall among the 8 values and the mean cosine to the right value, with float64, float32 and float32
   uncompensated decode statistics, for distractor streams up to ``--tokens`` long: real keys, and one
   real key repeated with 1 % noise (nearly repeated keys: the hard case for float32 sums). Rounding is
   the only thing that can lower float32's score.

Prints JSON, then tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from graftlm.kernels.echo import echo_chunked, echo_step, init_state
from graftlm.kernels.echo.reference import readout_operator

HEADS, RANK, VALUE_DIM, CHUNK, POWER = 9, 16, 64, 64, 2


def capture_hidden(tokens: int, layers: list[int], window: int = 2048) -> dict[int, torch.Tensor]:
    """{layer: [tokens, d]} attention inputs of SmolLM2-135M over real offline text."""
    import graftlm
    from graftlm.eval.needle import corpus_words

    model, tokenizer = graftlm.load_model("smollm2-135m")
    words, _ = corpus_words(tokens)  # at least as many words as tokens wanted
    ids = tokenizer(" ".join(words), return_tensors="pt").input_ids[0][:tokens]
    caught: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = [model.model.layers[layer].input_layernorm.register_forward_hook(
        lambda module, args, out, layer=layer: caught[layer].append(out[0].detach())) for layer in layers]
    with torch.no_grad():
        for start in range(0, ids.numel(), window):
            model.model(input_ids=ids[start:start + window][None])
    for hook in hooks:
        hook.remove()
    return {layer: torch.cat(parts) for layer, parts in caught.items()}


def project(hidden: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fresh Echo branch's z, q [1, H, T, r] and v [1, H, T, P] of hidden [T, d] (float64 copies)."""
    from graftlm.adapters.echo import EchoBranch

    torch.manual_seed(seed)
    branch = EchoBranch(hidden.shape[1], HEADS, RANK, VALUE_DIM)
    with torch.no_grad():
        z, q, v = branch.project(hidden[None].float())
    return z.double(), q.double(), v.double()


def decode(z, q, v, gamma, stats_dtype, compensate: bool, power: int = POWER) -> torch.Tensor:
    """y [1, H, T, P] of echo_step over the sequence (float64 outputs), with or without compensation."""
    state = init_state(1, z.shape[1], z.shape[-1], v.shape[-1], power=power, chunk_size=CHUNK,
                       stats_dtype=stats_dtype)
    if not compensate:
        state = dataclasses.replace(state, gram_carry=None, lag_carry=None)
    outputs = []
    for t in range(z.shape[2]):
        y_t, state = echo_step(state, z[:, :, t], q[:, :, t], v[:, :, t], gamma)
        outputs.append(y_t)
    return torch.stack(outputs, dim=2)


def relative_errors(y: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Per-position ||y - ref|| / ||ref|| over positions whose reference is non-zero (after chunk 1)."""
    diff = (y.double() - reference).norm(dim=-1)[..., CHUNK:].flatten()
    norm = reference.norm(dim=-1)[..., CHUNK:].flatten()
    err = diff[norm > 0] / norm[norm > 0]
    return {"median": err.median().item(), "p99": err.quantile(0.99).item(), "max": err.max().item()}


def output_rows(hidden: dict[int, torch.Tensor], lengths: list[int], seed: int) -> list[dict]:
    gamma = torch.tensor(1.2, dtype=torch.float64)
    rows = []
    for layer, states in hidden.items():
        z, q, v = project(states, seed + layer)
        for length in lengths:
            zt, qt, vt = z[:, :, :length], q[:, :, :length], v[:, :, :length]
            reference = echo_chunked(zt, qt, vt, gamma, power=POWER, chunk_size=CHUNK, stats_dtype=torch.float64)
            started = time.perf_counter()
            rows.append({"layer": layer, "tokens": length, "path": "chunked f32",
                         **relative_errors(echo_chunked(zt.float(), qt.float(), vt.float(), gamma.float(),
                                                        power=POWER, chunk_size=CHUNK,
                                                        stats_dtype=torch.float32), reference)})
            if length == max(lengths):
                decode64 = decode(zt, qt, vt, gamma, torch.float64, False)
                rows.append({"layer": layer, "tokens": length, "path": "decode f64 vs chunked f64",
                             **relative_errors(decode64, reference)})
                for compensate in (True, False):
                    y = decode(zt.float(), qt.float(), vt.float(), gamma.float(), torch.float32, compensate)
                    rows.append({"layer": layer, "tokens": length,
                                 "path": "decode f32" + ("" if compensate else " uncompensated"),
                                 **relative_errors(y, decode64)})
            rows[-1]["seconds"] = time.perf_counter() - started
    return rows


def recall_rows(hidden: dict[int, torch.Tensor], lengths: list[int], seed: int, n_facts: int = 8) -> list[dict]:
    """Top-1 fact recall (module docstring, item 3) per distractor length and statistics variant."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(RANK, RANK, generator=generator, dtype=torch.float64))
    facts, rest = basis[:, :n_facts], basis[:, n_facts:]  # orthonormal columns
    rows = []
    layer = next(iter(hidden))
    z, _, v = project(hidden[layer], seed + layer)
    z, v = z[:, :1], v[:, :1]  # one head
    fact_keys = (facts @ torch.randn(n_facts, n_facts, generator=generator, dtype=torch.float64)).T
    fact_keys = fact_keys / fact_keys.norm(dim=-1, keepdim=True)  # [N, r] unit, inside the fact subspace
    fact_values = torch.randn(n_facts, VALUE_DIM, generator=generator, dtype=torch.float64)
    scale = z[0, 0].norm(dim=-1).max()
    gamma = torch.tensor(1.0, dtype=torch.float64)
    noise = torch.randn(max(lengths), RANK, generator=generator, dtype=torch.float64)
    for kind, length in [(kind, length) for kind in ("real", "repeated") for length in lengths]:
        real = z[0, 0, :length]
        if kind == "repeated":  # the hard case for float32 sums: one real key again and again, 1 % noise
            real = real[:1] + 0.01 * real[:1].norm() * noise[:length]
        distractors = real @ rest @ rest.T  # no component along the facts
        keys = torch.cat([fact_keys * scale, distractors])[None, None]
        values = torch.cat([fact_values, v[0, 0, :length]])[None, None]
        for name, dtype, compensate in (("f64", torch.float64, False), ("f32", torch.float32, True),
                                        ("f32 uncompensated", torch.float32, False)):
            state = init_state(1, 1, RANK, VALUE_DIM, power=0, chunk_size=1, stats_dtype=dtype)
            if not compensate:
                state = dataclasses.replace(state, gram_carry=None, lag_carry=None)
            for t in range(keys.shape[2]):
                _, state = echo_step(state, keys[:, :, t].to(dtype), keys[:, :, t].to(dtype),
                                     values[:, :, t].to(dtype), gamma.to(dtype))
            readout = readout_operator(state.gram, state.lag, state.cross, gamma.to(dtype), 0, state.eps)
            answers = (readout[0, 0] @ fact_keys.T.to(dtype)).T.double()  # [N, P]
            similarity = torch.nn.functional.normalize(answers, dim=-1) @ torch.nn.functional.normalize(
                fact_values, dim=-1).T
            correct = (similarity.argmax(-1) == torch.arange(n_facts)).float().mean().item()
            rows.append({"distractors": length, "kind": kind, "stats": name, "recall": correct,
                         "mean_cosine": similarity.diagonal().mean().item()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--layers", default="3,15,27")
    parser.add_argument("--hidden", default="/tmp/graftlm_echo_hidden.pt", help="capture cache file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the JSON report here")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    path = Path(args.hidden)
    hidden = torch.load(path) if path.exists() else None
    if hidden is None or any(layer not in hidden or hidden[layer].shape[0] < args.tokens for layer in layers):
        hidden = capture_hidden(args.tokens, layers)
        torch.save(hidden, path)
    hidden = {layer: hidden[layer][:args.tokens] for layer in layers}
    lengths = sorted({min(args.tokens, n) for n in (2048, 8192, args.tokens)})
    report = {"settings": {**vars(args), "heads": HEADS, "rank": RANK, "value_dim": VALUE_DIM, "chunk": CHUNK,
                           "power": POWER},
              "outputs": output_rows(hidden, lengths, args.seed),
              "recall": recall_rows(hidden, lengths, args.seed)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("\nrelative output error of float32 statistics (reference: float64), SmolLM2-135M hidden states")
    print(f"{'layer':>5} {'tokens':>7} {'path':<28} {'median':>9} {'p99':>9} {'max':>9}")
    for row in report["outputs"]:
        print(f"{row['layer']:>5} {row['tokens']:>7} {row['path']:<28} {row['median']:>9.2e} {row['p99']:>9.2e} "
              f"{row['max']:>9.2e}")
    print("\nfact recall (top-1 of 8, ridge K = 0) after a stream of distractor keys")
    print(f"{'distractors':>11} {'kind':<9} {'stats':<18} {'recall':>7} {'cosine':>7}")
    for row in report["recall"]:
        print(f"{row['distractors']:>11} {row['kind']:<9} {row['stats']:<18} {row['recall']:>7.3f} "
              f"{row['mean_cosine']:>7.3f}")


if __name__ == "__main__":
    main()
