"""`Graft`: the base class of every graft module (what a graft does lives in its subclass)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from graftlm.adapters.config import GraftConfig
from graftlm.adapters.graft_cache import GraftState
from graftlm.patches import ArchitecturePatch

if TYPE_CHECKING:
    from graftlm.adapters.model import GraftModel


class Graft(nn.Module):
    """A graft: new parameters plus the hooks that wire them into a frozen base model.

    Lifecycle, driven by `GraftModel`:

    1. ``__init__(config, base_model, patch)`` builds the parameters (zero or identity init, so the
       freshly attached graft leaves the base model's logits exactly unchanged).
    2. ``install()`` registers hooks / attention implementations through the patch; every handle goes
       through `add_hook` (or `on_remove`) so ``remove()`` can undo all of it.
    3. ``remove()`` undoes ``install()``; the base model is then bit-identical to before.

    The base model is held by reference outside the module tree, so its parameters are not graft
    parameters. Hooks must check ``self.active`` and act as the identity when it is False
    (`GraftModel.disable_adapter`).

    Training: a graft with its own loss terms or forward mode (two passes, distillation, implicit
    gradients) overrides `training_loss`; the recipes loop calls nothing else.
    """

    config_class: type[GraftConfig] = GraftConfig
    #: the prefix of the `attach_lora` tensors in `adapter_state_dict`
    LORA_PREFIX = "lora."
    #: False for a graft whose generation state is not reordered with the beams: `GraftModel.generate`
    #: then refuses beam search while the graft is active.
    supports_beam_search: bool = True
    #: False for a graft whose generation state can't be cut back to an earlier length (`GraftState.crop_refusal`):
    #: `GraftModel.generate` then refuses assisted decoding, which crops the cache after each draft.
    supports_crop: bool = True

    def __init__(self, config: GraftConfig, base_model: nn.Module, patch: ArchitecturePatch):
        super().__init__()
        self.config = config
        self.patch = patch
        object.__setattr__(self, "_base_model", base_model)
        self.layer_indices = config.resolve_layers(base_model.config.num_hidden_layers)
        self.lora = None  # a PeftLoRA inside the base, when the graft trains LoRA too (`attach_lora`)
        self.active = True
        self._handles: list[RemovableHandle] = []
        self._undo: list[Callable[[], None]] = []

    @property
    def base_model(self) -> nn.Module:
        return self._base_model

    @property
    def active(self) -> bool:
        return getattr(self, "_active", True)

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value
        if getattr(self, "lora", None) is not None:
            self.lora.set_active(value)

    def install(self) -> None:  # pragma: no cover - every graft implements it
        raise NotImplementedError

    def attach_lora(self, r: int, alpha: float, target_modules: list[str], dropout: float = 0.0,
                    layers: list[int] | None = None) -> None:
        """Put peft LoRA on the base's ``target_modules`` as part of this graft (saved with prefix ``lora.``,
        toggled with ``active``, removed with the graft)."""
        from graftlm.adapters.lora import PeftLoRA

        # One graft of a kind per model and one GraftModel per base, so the kind names the peft adapter
        # uniquely and the same in every process and run (sharded checkpoints key by parameter name).
        self.lora = PeftLoRA(self.base_model, self.config.graft_type, r, alpha, dropout, target_modules, layers)
        self.on_remove(self.lora.remove)

    def add_hook(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        return handle

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Register an undo action (e.g. restore a replaced module or attention implementation)."""
        self._undo.append(undo)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def external_parameters(self) -> list[nn.Parameter]:
        """Graft parameters that live inside the base model: the peft LoRA layers of `attach_lora`."""
        return self.lora.parameters() if self.lora is not None else []

    def all_parameters(self) -> list[nn.Parameter]:
        """This graft's parameters: its own and those it placed inside the base model."""
        return list(self.parameters()) + self.external_parameters()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors saved in ``adapter_model.safetensors``: this module's state dict, and the LoRA
        tensors of `attach_lora` under ``lora.<module path>``."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        if self.lora is not None:
            state.update({self.LORA_PREFIX + k: v for k, v in self.lora.state_dict().items()})
        return state

    def adapter_state_paths(self, graft_prefix: str, base_prefix: str) -> dict[str, str]:
        """Each `adapter_state_dict` key -> its key in the state dict of a module that holds this graft at
        ``graft_prefix`` and the base model at ``base_prefix`` (in a `GraftModel`: ``grafts.<name>.`` and
        ``base_model.``), to pick the adapter out of a gathered full state dict (FSDP)."""
        paths = {k: graft_prefix + k for k in self.state_dict()}
        if self.lora is not None:
            paths.update({self.LORA_PREFIX + k: base_prefix + path for k, path in self.lora.tensor_paths().items()})
        return paths

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load saved tensors (names already checked against `adapter_state_dict` by the loader)."""
        prefix = self.LORA_PREFIX
        self.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)}, strict=True)
        if self.lora is not None:
            self.lora.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def prepare_generate_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Adjust ``generate`` keyword arguments before generation (`GraftModel.generate` has already put its
        `GraftCache` in them, under `graftlm.patches.cache_kwarg.cache_kwarg()`; a graft may check it); the
        default leaves them unchanged."""
        return kwargs

    # -- the generation cache (graftlm.adapters.graft_cache) ----------------------------------------
    @property
    def state_key(self) -> str:
        """This graft's key in `GraftCache.graft_states`: its graft type (a stack holds one graft per type)."""
        return self.config.graft_type

    def make_cache_state(self) -> GraftState | None:
        """A fresh generation state for a `GraftCache` (None, the default: the graft keeps none)."""
        return None

    def cache_layers(self) -> dict[int, Any]:
        """Key/value cache layers this graft puts in a `GraftCache` instead of the base's own, by layer index
        (now, for the config as it is); the default puts none."""
        return {}

    def cache_layers_replaced(self) -> set[int]:
        """Layers whose key/value cache layer this graft may replace (`cache_layers` under any setting it can
        reach), checked against the other grafts when it is attached."""
        return set()

    def full_key_layers(self) -> set[int]:
        """Layers whose whole key/value cache this graft reads at decode (a replaced layer keeps less)."""
        return set()

    @contextmanager
    def config_overrides(self, values: dict[str, Any]) -> Iterator[None]:
        """Set config fields for the block (an evaluation variant, e.g. a solver at one iteration); grafts
        that derive state from their config at init override this to rebuild it."""
        unknown = [k for k in values if not hasattr(self.config, k)]
        if unknown:
            raise ValueError(f"{type(self.config).__name__} has no field {', '.join(map(repr, unknown))}")
        saved = {k: getattr(self.config, k) for k in values}
        try:
            for key, value in values.items():
                setattr(self.config, key, value)
            yield
        finally:
            for key, value in saved.items():
                setattr(self.config, key, value)

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """This graft's optimizer parameter groups (``{"params": [...], "lr": ...}``) for the recipe's peak
        learning rate ``lr``: a graft whose parameters want different rates (SST's blend beside its LoRA)
        returns one group per rate. The default is one group of every parameter at ``lr``."""
        return [{"params": self.all_parameters(), "lr": lr}]

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Called by the recipes loop before each optimizer step (1-based ``step``): schedules such as a
        ramp from the frozen path to the graft's path live here. The default does nothing."""

    @property
    def supplies_training_loss(self) -> bool:
        """Whether `training_loss` returns terms with this config (a stack can train only one such graft:
        each runs its own forward). Default: whether the class overrides `training_loss`."""
        return type(self).training_loss is not Graft.training_loss

    def training_statistics(self) -> dict[str, torch.Tensor | float]:
        """Figures logged with every training step beside the loss (e.g. per-layer gate values), asked of
        every graft after the step's forward: floats or device scalars (kept on the device, so asking makes
        no host sync; the loop reads them once per log line). The default logs nothing."""
        return {}

    def training_loss(self, model: GraftModel, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Loss terms for one training batch, or None for the plain LM loss of ``model(**batch)``.

        Returns a dict with at least ``"loss"`` (the scalar to backpropagate); other entries are logged.
        ``model`` is the `GraftModel`, or under ``graftlm.trainer.GraftTrainer`` with several processes the
        DDP wrapper around it: call it (``model(**batch)``) rather than reading its attributes.
        """
        return None

    def extra_repr(self) -> str:
        return f"graft_type={self.config.graft_type!r}, layers={self.layer_indices}"
