"""Echo graft, model level (issue 6 item 6): decode time per token vs context, and the cache actually held.

    python3 benchmarks/echo_graft.py [--model tiny|smollm2-135m|gemma-3-270m] [--contexts 512 2048 8192]
                                     [--replace-layers all|half] [--decode-steps 16] [--threads 2]

For each context length C: prefill a random prompt of C tokens, then time ``--decode-steps`` one-token
forwards through the cache, for (a) the base model with its own ``DynamicCache`` and (b) the same model
with an Echo graft in ``mode="replace"`` (window ``--window`` tokens, chunk ``--chunk-size``, rank
``--rank``; W_o random so the branch really runs) using its ``EchoCache``. Reports per-token decode time
(median of the steps; each step is a whole-model forward, so per-token overhead shared by both is
included) and the bytes the cache holds after those steps: KV of the replaced layers, KV of the other layers,
and the Echo state. ``tiny`` is a random Llama (d 512, 4 layers, 8 heads of 64, no GQA) built in
memory; the embedded checkpoints load from the local cache. Prints JSON, then a table.
"""

import argparse
import json
import statistics
import time

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
def decode_run(model, cache, context: int, steps: int, vocab: int) -> tuple[float, float]:
    """Prefill ``context`` random tokens, then ``steps`` one-token forwards. Returns (prefill s, median s/token)."""
    generator = torch.Generator().manual_seed(context)
    prompt = torch.randint(3, vocab, (1, context), generator=generator)
    started = time.perf_counter()
    out = model(input_ids=prompt, **with_cache({}, cache), use_cache=True)
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
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    base = load(args.model)
    layers = base.config.num_hidden_layers
    replaced = list(range(layers)) if args.replace_layers == "all" else half_of_layers(base)
    vocab = base.config.vocab_size
    rows = []
    for context in args.contexts:
        cache = DynamicCache(config=base.config)
        prefill, per_token = decode_run(base, cache, context, args.decode_steps, vocab)
        rows.append({"model": args.model, "variant": "base", "context": context, "prefill_s": prefill,
                     "decode_ms_per_token": 1e3 * per_token, **cache_bytes(cache, replaced)})

    config = EchoConfig(mode="replace", target_layers=replaced, window=args.window, chunk_size=args.chunk_size,
                        rank=args.rank)
    model = attach_adapter(base, config)
    graft = model.grafts["default"]
    with torch.no_grad():
        for branch in graft.branches.values():
            branch.w_o.weight.normal_(0, 0.02)
    for context in args.contexts:
        cache = graft.make_cache()
        prefill, per_token = decode_run(model, cache, context, args.decode_steps, vocab)
        rows.append({"model": args.model, "variant": f"echo-replace-{args.replace_layers}", "context": context,
                     "prefill_s": prefill, "decode_ms_per_token": 1e3 * per_token, **cache_bytes(cache, replaced)})

    report = {"settings": {**vars(args), "replaced_layers": replaced, "num_layers": layers,
                           "torch_threads": torch.get_num_threads()}, "rows": rows}
    print(json.dumps(report, indent=2))
    print(f"\n{args.model}: decode per token (median of {args.decode_steps}) and cache held after it (context + "
          f"{args.decode_steps + 2} tokens); Echo replaces {len(replaced)}/{layers} layers, window {args.window}, chunk {args.chunk_size}, "
          f"rank {args.rank}")
    header = f"{'variant':<22}{'context':>8}{'prefill s':>11}{'ms/token':>10}{'KV replaced':>14}" \
             f"{'KV other':>12}{'Echo state':>12}"
    print(header)
    for r in rows:
        print(f"{r['variant']:<22}{r['context']:>8}{r['prefill_s']:>11.2f}{r['decode_ms_per_token']:>10.2f}"
              f"{r['kv_bytes_replaced_layers'] / 2**20:>12.2f}MB{r['kv_bytes_other_layers'] / 2**20:>10.2f}MB"
              f"{r['echo_state_bytes'] / 2**10:>10.1f}KB")


if __name__ == "__main__":
    main()
