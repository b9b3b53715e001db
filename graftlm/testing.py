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
    """The cache ``generate`` would use: the one a graft supplies (EchoCache, RangeSearchCache, ...), else
    a plain ``DynamicCache``."""
    from transformers import DynamicCache

    from graftlm.patches.cache_kwarg import cache_from_kwargs

    kwargs = {"use_cache": True}
    for graft in getattr(model, "grafts", {}).values():
        kwargs = graft.prepare_generate_kwargs(kwargs)
    cache = cache_from_kwargs(kwargs)
    return DynamicCache(config=model.config) if cache is None else cache
