"""`TrainingObjective`: the loss of one batch, the only place the loop meets a graft's training hook."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graftlm.adapters import GraftModel


class TrainingObjective(nn.Module):
    """The loss terms of one batch for a `GraftModel`.

    The grafts' ``training_loss(model, batch)`` hooks are asked in attach order; the first that returns
    a dict supplies the batch's terms (its ``"loss"`` is backpropagated, other entries are logged) and
    later grafts are not asked. When every hook returns None the loss is the plain LM loss
    ``model(**batch).loss``. A stack where two grafts each supply their own loss terms is refused
    (`graft_training_terms`). Every graft's ``training_statistics()``
    joins the terms after the forward (logged, never backpropagated).

    The loop wraps this module, not the `GraftModel`, in DDP/FSDP, so every forward a graft's hook runs
    (two passes, a teacher pass, a fixed-point solve) happens inside the wrapper's forward and gradient
    synchronisation sees all of them.
    """

    def __init__(self, graft_model: GraftModel):
        super().__init__()
        self.graft_model = graft_model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        terms = graft_training_terms(self.graft_model, batch)
        terms = dict(terms) if terms is not None else {"loss": self.graft_model(**batch).loss}
        for graft in self.graft_model.grafts.values():
            terms.update({k: v for k, v in graft.training_statistics().items() if k not in terms})
        return terms


def graft_training_terms(graft_model: GraftModel, batch: dict[str, Any],
                         forward: nn.Module | None = None) -> dict[str, Any] | None:
    """The loss terms of the first graft (in attach order) whose ``training_loss`` hook supplies them, or
    None when every hook leaves the batch to the plain LM loss. ``forward``: the module the hooks call
    (default ``graft_model``; `graftlm.trainer.GraftTrainer` passes the Trainer's, maybe DDP-wrapped, model)."""
    suppliers = [f"{name!r} ({graft.config.graft_type})" for name, graft in graft_model.grafts.items()
                 if graft.active and graft.supplies_training_loss]
    if len(suppliers) > 1:
        raise ValueError(
            f"the grafts {', '.join(suppliers)} each supply their own training loss (each runs its own forward), "
            f"and a stack trains with one: turn the others' off (e.g. Echo distill_weight=0), or train the "
            f"grafts one at a time and stack the saved adapters"
        )
    for name, graft in graft_model.grafts.items():
        terms = graft.training_loss(forward if forward is not None else graft_model, batch)
        if terms is None:
            continue
        if not isinstance(terms, dict) or "loss" not in terms:
            raise TypeError(
                f"graft {name!r} ({type(graft).__name__}).training_loss must return None or a dict with a "
                f"'loss' entry, got {type(terms).__name__}"
            )
        return terms
    return None
