"""Echo graft, model level (issue 6 item 6): decode time per token vs context, and the cache actually held.

    python3 benchmarks/echo_graft.py [--model tiny|smollm2-135m|gemma-3-270m] [--contexts 512 2048 8192]
                                     [--replace-layers all|half | --keep-layers 3 4] [--decode-steps 16]
                                     [--threads 2] [--prefill-chunk 4096] [--out DIR]

For each context length C: prefill a random prompt of C tokens, then time ``--decode-steps`` one-token
forwards through the cache, for (a) the base model with its own ``DynamicCache`` and (b) the same model
with an Echo graft in ``mode="replace"`` (window ``--window`` tokens, chunk ``--chunk-size``, rank
``--rank``; W_o random so the branch really runs) using its ``EchoCache``. Reports per-token decode time
(median of the steps; each step is a whole-model forward, so per-token overhead shared by both is
included) and the bytes the cache holds after those steps: KV of the replaced layers, KV of the other layers,
and the Echo state. ``tiny`` is a random Llama (d 512, 4 layers, 8 heads of 64, no GQA) built in
memory; the embedded checkpoints load from the local cache. ``--keep-layers``: replace every layer but these (issue 15: all but the few least replaceable).
Prints JSON, then a table; ``--out``: also writes ``echo_graft_<model>.json`` and ``.md`` there.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from graftlm.adapters import attach_adapter
from graftlm.adapters.echo import EchoConfig
from graftlm.patches.cache_kwarg import with_cache


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=65536,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def load(name: str) -> torch.nn.Module:
    if name == "tiny":
        return tiny_model()
    from graftlm.models import load_model

    model, _ = load_model(name, dtype=torch.float32)
    return model.eval()


def half_of_layers(model) -> list[int]:
    """Half the layers: the full-attention ones first (on Gemma 3 those hold the growing KV), then every
    other remaining layer."""
    layers = model.config.num_hidden_layers
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * layers
    full = [i for i in range(layers) if types[i] == "full_attention"]
    if len(full) == layers:
        return list(range(0, layers, 2))
    rest = [i for i in range(layers) if i not in full][::2]
    return sorted((full + rest)[: layers // 2])


def cache_bytes(cache, replaced: list[int]) -> dict:
    kv = [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
          for layer in cache.layers]
    echo = sum(cache.echo_state_bytes(i) for i in replaced) if hasattr(cache, "echo") else 0
    return {"kv_bytes_replaced_layers": sum(kv[i] for i in replaced),
            "kv_bytes_other_layers": sum(b for i, b in enumerate(kv) if i not in replaced),
            "echo_state_bytes": echo}


@torch.no_grad()
def decode_run(model, cache, context: int, steps: int, vocab: int, prefill_chunk: int = 0) -> tuple[float, float]:
    """Prefill ``context`` random tokens (in pieces of ``prefill_chunk`` through the cache when > 0, which bounds
    the attention's [T, context] scores), then ``steps`` one-token forwards. Returns (prefill s, median s/token)."""
    generator = torch.Generator().manual_seed(context)
    prompt = torch.randint(3, vocab, (1, context), generator=generator)
    started = time.perf_counter()
    step = prefill_chunk if prefill_chunk > 0 else context
    for start in range(0, context, step):
        piece = prompt[:, start:start + step]
        out = model(input_ids=piece, **with_cache({}, cache), use_cache=True, logits_to_keep=1)  # not T x vocab
    prefill = time.perf_counter() - started
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps + 2):  # the first two are warm-up
        started = time.perf_counter()
        out = model(input_ids=token, **with_cache({}, cache), use_cache=True)
        times.append(time.perf_counter() - started)
        token = out.logits[:, -1:].argmax(-1)
    return prefill, statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--replace-layers", default="all", choices=["all", "half"],
                        help="layers whose attention Echo replaces (half: full-attention layers first, then every other)")
    parser.add_argument("--keep-layers", type=int, nargs="+", default=None,
                        help="replace every layer but these (wins over --replace-layers)")
    parser.add_argument("--out", default=None, help="directory for the JSON and markdown table")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sink-tokens", type=int, default=EchoConfig.sink_tokens,
                        help="first tokens the window layers keep (EchoConfig.sink_tokens)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prefill in pieces of this many tokens through the cache (0: one forward); at 32k "
                             "a single forward's attention scores do not fit in 24 GiB")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    base = load(args.model)
    layers = base.config.num_hidden_layers
    if args.keep_layers is not None:
        replaced = [i for i in range(layers) if i not in {k % layers for k in args.keep_layers}]
        label = f"echo-replace-all-but-{','.join(map(str, args.keep_layers))}"
    else:
        replaced = list(range(layers)) if args.replace_layers == "all" else half_of_layers(base)
        label = f"echo-replace-{args.replace_layers}"
    vocab = base.config.vocab_size
    rows = []
    for context in args.contexts:
        cache = DynamicCache(config=base.config)
        prefill, per_token = decode_run(base, cache, context, args.decode_steps, vocab, args.prefill_chunk)
        rows.append({"model": args.model, "variant": "base", "context": context, "prefill_s": prefill,
                     "decode_ms_per_token": 1e3 * per_token, **cache_bytes(cache, replaced)})

    config = EchoConfig(mode="replace", target_layers=replaced, window=args.window, chunk_size=args.chunk_size,
                        rank=args.rank, sink_tokens=args.sink_tokens)
    model = attach_adapter(base, config)
    graft = model.grafts["default"]
    with torch.no_grad():
        for branch in graft.branches.values():
            branch.w_o.weight.normal_(0, 0.02)
    for context in args.contexts:
        cache = graft.make_cache()
        prefill, per_token = decode_run(model, cache, context, args.decode_steps, vocab, args.prefill_chunk)
        rows.append({"model": args.model, "variant": label, "context": context,
                     "prefill_s": prefill, "decode_ms_per_token": 1e3 * per_token, **cache_bytes(cache, replaced)})

    report = {"settings": {**vars(args), "replaced_layers": replaced, "num_layers": layers,
                           "torch_threads": torch.get_num_threads(), "dtype": str(base.dtype),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, "rows": rows}
    print(json.dumps(report, indent=2))
    text = markdown(report)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"echo_graft_{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"echo_graft_{args.model}.md").write_text(text)


def markdown(report: dict) -> str:
    """The rows as a markdown table, each Echo row with its ratios to the base at the same context."""
    s, rows = report["settings"], report["rows"]
    base = {r["context"]: r for r in rows if r["variant"] == "base"}
    held = lambda r: r["kv_bytes_replaced_layers"] + r["kv_bytes_other_layers"] + r["echo_state_bytes"]
    lines = [(f"{s['model']} ({s['dtype']}, {s['torch_threads']} threads): decode time per token (median of "
              f"{s['decode_steps']}) and the cache held after it (context + {s['decode_steps'] + 2} tokens); Echo "
              f"replaces {len(s['replaced_layers'])}/{s['num_layers']} layers (window {s['window']}, chunk "
              f"{s['chunk_size']}, rank {s['rank']})."), "",
             ("| variant | context | prefill s | ms / token | KV, replaced layers | KV, other layers | Echo state | "
              "held / base | ms / token / base |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base[r["context"]]
        lines.append(f"| {r['variant']} | {r['context']} | {r['prefill_s']:.2f} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['kv_bytes_replaced_layers'] / 2**20:.2f} MiB | {r['kv_bytes_other_layers'] / 2**20:.2f} MiB | "
                     f"{r['echo_state_bytes'] / 2**10:.1f} KiB | {held(r) / held(b):.3f} | "
                     f"{r['decode_ms_per_token'] / b['decode_ms_per_token']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
