"""Real keys, values and queries for the range-search benchmarks, captured from the embedded checkpoints.

`load_capture(model, n_tokens)` returns, for every full-attention layer of the model, the post-RoPE keys
and values of the first ``n_tokens`` tokens of a fixed real text, and the post-RoPE (and, for Gemma 3,
post-q-norm) queries of a few decode positions near each benchmark length (`query_positions`). A query at
position p is exactly what a one-token decode step at p computes, so it attends keys [0, p].

The text: the distinct licence files of /usr/share/common-licenses interleaved with a fixed list of Python
standard-library sources (``/root/.pyenv/versions/3.11.7/lib/python3.11`` or the running Python's), joined
by blank lines and tokenized once; the first ``n_tokens`` tokens are used. Prefill runs in chunks of
``chunk`` tokens through a DynamicCache so memory stays bounded; queries are recorded by an attention
function registered for the capture, which delegates to SDPA.

Captures are cached on disk outside the repository (``$GRAFTLM_CACHE/captures`` or
``~/.cache/graftlm/captures``) and regenerated when absent.

    python3 benchmarks/range_search_captures.py --model gemma-3-270m --tokens 32768
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

CAPTURE_VERSION = 1
LICENSES_DIR = "/usr/share/common-licenses"
PY_LIB_CANDIDATES = ("/root/.pyenv/versions/3.11.7/lib/python3.11", sysconfig.get_paths()["stdlib"])
PY_SOURCES = (
    "argparse.py", "textwrap.py", "json/decoder.py", "pathlib.py", "inspect.py", "typing.py", "dataclasses.py",
    "functools.py", "collections/__init__.py", "email/message.py", "http/client.py", "logging/__init__.py",
    "subprocess.py", "tarfile.py", "unittest/case.py", "asyncio/base_events.py",
)
CAPTURE_TOKENS = {"smollm2-135m": 8192, "gemma-3-270m": 32768}  # the capture length the benchmarks read, per model
QUERIES_PER_LENGTH = 8
QUERY_STRIDE = 64


def _licence_texts() -> list[str]:
    seen, texts = set(), []
    if os.path.isdir(LICENSES_DIR):
        for name in sorted(os.listdir(LICENSES_DIR)):
            path = os.path.realpath(os.path.join(LICENSES_DIR, name))
            if path not in seen and os.path.isfile(path):
                seen.add(path)
                texts.append(Path(path).read_text(encoding="utf-8", errors="ignore"))
    return texts


def _python_sources() -> list[str]:
    lib = next((Path(p) for p in PY_LIB_CANDIDATES if (Path(p) / "argparse.py").is_file()), None)
    if lib is None:
        return []
    return [(lib / name).read_text(encoding="utf-8", errors="ignore") for name in PY_SOURCES if (lib / name).is_file()]


def real_text() -> str:
    """Licences and Python sources, interleaved one by one, joined by blank lines."""
    licences, sources = _licence_texts(), _python_sources()
    if not licences and not sources:
        raise RuntimeError("no real text found (no /usr/share/common-licenses and no Python stdlib sources)")
    parts = []
    for i in range(max(len(licences), len(sources))):
        parts += [t[i] for t in (licences, sources) if i < len(t)]
    return "\n\n".join(parts)


def real_text_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` token ids of `real_text` (with the tokenizer's BOS): [1, n_tokens]."""
    ids = tokenizer(real_text(), return_tensors="pt").input_ids
    if ids.shape[1] < n_tokens:
        raise ValueError(f"the real text has {ids.shape[1]} tokens, fewer than {n_tokens}")
    return ids[:, :n_tokens]


def benchmark_lengths(n_tokens: int) -> list[int]:
    """Key counts the kernel benchmark uses from a capture of n_tokens: powers of two from 2048 up."""
    lengths, n = [], 2048
    while n <= n_tokens:
        lengths.append(n)
        n *= 2
    return lengths or [n_tokens]


def query_positions(n_tokens: int) -> list[int]:
    """Decode positions whose queries are kept: QUERIES_PER_LENGTH per benchmark length L, at L - 1 - 64 j."""
    return sorted({length - 1 - QUERY_STRIDE * j for length in benchmark_lengths(n_tokens)
                   for j in range(QUERIES_PER_LENGTH)})


def capture_path(model_name: str, n_tokens: int) -> Path:
    from graftlm.models import cache_dir

    digest = hashlib.sha1(f"{CAPTURE_VERSION}|{PY_SOURCES}|{QUERIES_PER_LENGTH}|{QUERY_STRIDE}".encode()).hexdigest()
    return cache_dir() / "captures" / f"{model_name}-{n_tokens}-{digest[:10]}.pt"


def capture(model_name: str, n_tokens: int, chunk: int = 1024) -> dict:
    """Prefill ``n_tokens`` of real text in chunks and record keys, values and decode queries.

    Returns {"model", "n_tokens", "layers": [layer ids], "scaling": {layer: float}, "keys": {layer:
    [1, H_kv, N, D]}, "values": {layer: [1, H_kv, N, D_v]}, "queries": {layer: [P, H_q, D]},
    "query_positions": [P]} (float32 on the CPU).
    """
    from transformers import DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import graftlm
    from graftlm.patches import get_patch

    model, tokenizer = graftlm.load_model(model_name)
    model.eval()
    patch = get_patch(model)
    types = patch.layer_types(model)
    layers = [i for i, t in enumerate(types) if t == "full_attention"]
    positions = query_positions(n_tokens)
    wanted = torch.tensor(positions)
    queries: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    layer_scaling: dict[int, float] = {}
    state = {"start": 0}

    def capturing_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = module.layer_idx
        if layer in queries:
            start, length = state["start"], query.shape[2]
            inside = wanted[(wanted >= start) & (wanted < start + length)] - start
            if inside.numel():
                queries[layer].append(query[0, :, inside].transpose(0, 1).float().clone())
            layer_scaling[layer] = float(module.scaling if scaling is None else scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)

    name = "graftlm_capture"
    patch.register_attention(name, capturing_attention)
    previous = patch.set_attention_implementation(model, name)
    ids = real_text_ids(tokenizer, n_tokens)
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for start in range(0, n_tokens, chunk):
                state["start"] = start
                model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
                print(f"  capture {model_name}: {min(start + chunk, n_tokens)}/{n_tokens} tokens, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        patch.set_attention_implementation(model, previous)
        patch.unregister_attention(name)
    return {
        "model": model_name, "n_tokens": n_tokens, "layers": layers, "scaling": layer_scaling,
        "keys": {i: cache.layers[i].keys.float().clone() for i in layers},
        "values": {i: cache.layers[i].values.float().clone() for i in layers},
        "queries": {i: torch.cat(queries[i]) for i in layers}, "query_positions": positions,
        "text_tokens": ids[0].tolist(),
    }


def load_capture(model_name: str, n_tokens: int, regenerate: bool = False) -> dict:
    """The cached capture of `capture` (made and saved first when absent or ``regenerate``)."""
    path = capture_path(model_name, n_tokens)
    if path.exists() and not regenerate:
        return torch.load(path, weights_only=True)
    data = capture(model_name, n_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_capture(args.model, args.tokens, regenerate=args.regenerate)
    k = data["keys"][data["layers"][0]]
    print(f"{args.model}: {len(data['layers'])} layers, keys {tuple(k.shape)}, "
          f"{len(data['query_positions'])} query positions -> {capture_path(args.model, args.tokens)}")


if __name__ == "__main__":
    main()
