"""Helpers shared by the tests and the benchmarks that run every graft: open its tensors, find its cache."""

from __future__ import annotations

import torch
from torch import nn


def open_grafts(model: nn.Module, seed: int = 3) -> nn.Module:
    """Move every graft of ``model`` off its exact-identity init, so no code path is skipped as closed:
    gates to 0.5, all-zero tensors (output projections, LoRA's B, which lives in the base) to N(0, 0.02),
    drawn from a seeded CPU generator. Returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for graft in model.grafts.values():
            named = dict(graft.named_parameters())
            seen = {id(p) for p in named.values()}
            named.update((f"extra.{i}", p) for i, p in enumerate(graft.all_parameters()) if id(p) not in seen)
            for name, p in named.items():
                if "gate" in name:
                    p.fill_(0.5)
                elif not p.any():
                    p.copy_((0.02 * torch.randn(p.shape, generator=generator)).to(p))
    return model


def generation_cache(model: nn.Module):
    """The cache ``generate`` would use: a `GraftModel`'s `GraftCache` (every active graft's state), else a
    plain ``DynamicCache``."""
    from transformers import DynamicCache

    make_cache = getattr(model, "make_cache", None) if hasattr(model, "grafts") else None
    return make_cache() if make_cache is not None else DynamicCache(config=model.config)


def count_decode_syncs(model: nn.Module, ids: torch.Tensor, steps: int, with_mask: bool = False):
    """Host syncs over ``steps`` greedy one-token forwards on the graft's generation cache after a prefill
    of ``ids`` [B, T] (`graftlm.host_syncs.HostSyncCounter`; ``with_mask``: pass a growing all-ones
    attention mask). Returns (counts by kind over all steps, the cache)."""
    from graftlm.host_syncs import HostSyncCounter
    from graftlm.patches.cache_kwarg import with_cache

    cache = generation_cache(model)
    mask = torch.ones_like(ids)
    extra = lambda: {"attention_mask": mask} if with_mask else {}
    with torch.no_grad():
        token = model(input_ids=ids, **with_cache({}, cache), use_cache=True, **extra()).logits[:, -1:].argmax(-1)
        with HostSyncCounter() as syncs:
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(input_ids=token, **with_cache({}, cache), use_cache=True, **extra())
                token = out.logits[:, -1:].argmax(-1)
    return dict(syncs.counts), cache
