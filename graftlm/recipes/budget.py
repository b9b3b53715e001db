"""Parameter budgets: the LoRA rank whose trainable-parameter count is closest to a graft's.

"LoRA, same budget" in one call::

    graft_params = sum(p.numel() for p in graft_model.graft_parameters())
    r = lora_rank_for_budget(base_model, graft_params)
    baseline = attach_adapter(fresh_base, LoRAConfig(r=r))
"""

from __future__ import annotations

from torch import nn

from graftlm.adapters.lora import DEFAULT_TARGET_MODULES
from graftlm.patches import get_patch


def lora_params_per_rank(model: nn.Module, target_modules: list[str] | None = None,
                         target_layers: list[int] | None = None) -> int:
    """Trainable LoRA parameters per unit of rank: the sum of (in + out) features of every targeted Linear.

    Targets follow peft's rule for plain names: a module whose name ends with one of ``target_modules``,
    inside the decoder layers ``target_layers`` (all when None). Raises ValueError when nothing matches.
    """
    base = getattr(model, "base_model", model) if hasattr(model, "grafts") else model
    targets = list(target_modules or DEFAULT_TARGET_MODULES)
    layers = get_patch(base).decoder_layers(base)
    indices = range(len(layers)) if target_layers is None else [i % len(layers) for i in target_layers]
    per_rank = 0
    for index in indices:
        for name, module in layers[index].named_modules():
            linear = getattr(module, "base_layer", module)
            if name.split(".")[-1] in targets and isinstance(linear, nn.Linear):
                per_rank += linear.in_features + linear.out_features
    if per_rank == 0:
        raise ValueError(f"no Linear module named {targets} in the model's decoder layers")
    return per_rank


def lora_rank_for_budget(model: nn.Module, n_params: int, target_modules: list[str] | None = None,
                         target_layers: list[int] | None = None) -> int:
    """The rank (>= 1) whose LoRA trainable-parameter count is closest to ``n_params``."""
    per_rank = lora_params_per_rank(model, target_modules, target_layers)
    below = max(1, n_params // per_rank)
    return min((below, below + 1), key=lambda r: (abs(r * per_rank - n_params), r))
