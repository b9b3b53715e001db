"""The demo's range-search part: decode over a long real-text context, dense vs range search.

Both runs greedily decode the same number of tokens after the same prompt; range search uses its fast
block mode (issue 19: contiguous key blocks read in order of their estimated softmax mass until the mass
target, heads that cannot be pruned computed densely, and a layer whose plans do not pay decoding densely
without planning: `graftlm.kernels.range_search.schedule`). Reported: decode time per token of each,
whether the generated tokens agree, the fraction of the exact softmax mass the attended keys carry, the
fraction of keys attended, and the share of layer steps that planned through the index (recall is
measured in a separate tracked run so the timed run does not pay for computing every score).
"""

from __future__ import annotations

import itertools
import statistics
import time


def _decode_seconds_per_token(model, input_ids, new_tokens: int, **kwargs) -> tuple[float, list[int]]:
    """Greedy decode; returns (median seconds per decode step, generated ids)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, ids, scores):
            stamps.append(time.perf_counter())
            return scores

    out = model.generate(input_ids=input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, logits_processor=LogitsProcessorList([Clock()]), **kwargs)
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(steps), out[0, input_ids.shape[1]:].tolist()


def compare_range_search(base_model, tokenizer, context_tokens: int = 2048, new_tokens: int = 16,
                         mass_target: float = 0.99) -> list[tuple[str, str]]:
    """Rows for the demo table: dense vs range-search decode on ``context_tokens`` of real text."""
    from graftlm import attach_adapter
    from graftlm.adapters.range_search import RangeSearchConfig
    from graftlm.eval.needle import corpus_words
    from graftlm.patches.cache_kwarg import with_cache

    words, _ = corpus_words(min_words=2 * context_tokens)
    text = " ".join(words[: 2 * context_tokens])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :context_tokens]
    dense_s, dense_ids = _decode_seconds_per_token(base_model, ids, new_tokens)

    config = {"mode": "block", "mass_target": mass_target, "window": 64, "n_sink": 4, "min_keys": 0}
    tracked = attach_adapter(base_model, RangeSearchConfig(track_recall=True, **config), adapter_name="range")
    tracked.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    log = tracked.grafts["range"].recall_log
    mass = statistics.mean(r["mass_recall"] for r in log)
    kept = statistics.mean(r["kept_fraction"] for r in log)
    tracked.detach()

    fast = attach_adapter(base_model, RangeSearchConfig(**config), adapter_name="range")
    cache = fast.grafts["range"].make_cache()
    range_s, range_ids = _decode_seconds_per_token(fast, ids, new_tokens, **with_cache({}, cache))
    fast.detach()
    schedules = [s.schedule for s in cache.range_search.values() if s.schedule is not None]
    planned = sum(s.n_planned for s in schedules) / max(1, sum(s.n_planned + s.n_dense for s in schedules))
    agree = sum(a == b for a, b in zip(dense_ids, range_ids)) / len(dense_ids)
    label = f"range search (block mode), {ids.shape[1]} tokens, mass target {mass_target}"
    return [
        (f"{label}: ms/token dense vs range",
         f"{1000 * dense_s:.1f} vs {1000 * range_s:.1f} (x{dense_s / range_s:.2f})"),
        (f"{label}: softmax mass kept", f"{mass:.3f} (keys attended {kept:.3f})"),
        (f"{label}: tokens equal to dense", f"{agree:.2f}"),
        (f"{label}: layer steps planned through the index (the rest: dense streaks where plans did not pay)",
         f"{planned:.2f}"),
    ]
