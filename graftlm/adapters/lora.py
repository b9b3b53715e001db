"""LoRA on the frozen base, through peft: the baseline graft, and a helper other grafts reuse.

``LoRAConfig`` makes plain LoRA a graft like any other, so the recipes and eval treat "LoRA, same
trainable-parameter budget" exactly as they treat SST or Attractor. Grafts that optionally train LoRA
on the base too (SST's ``lora_r``, Attractor's backbone LoRA) call `PeftLoRA` the same way.
LoRA's B matrices start at zero, so a fresh adapter reproduces the base logits exactly. The LoRA
matrices are float32 on a bf16 base (`graftlm.dtype_policy`); peft computes the update in their dtype
and casts the layer's output back to the base's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from graftlm.adapters.config import GraftConfig
from graftlm.adapters.graft import Graft
from graftlm.adapters.registry import register_graft
from graftlm.dtype_policy import parameter_dtype

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


class PeftLoRA:
    """peft LoRA layers injected into a base model's modules, removable bit-exactly.

    The LoRA tensors live inside the base model (peft replaces each target ``nn.Linear`` by a LoRA
    wrapper around it); `remove` puts the original modules back.
    """

    def __init__(
        self,
        base_model: nn.Module,
        adapter_name: str,
        r: int,
        alpha: float,
        dropout: float,
        target_modules: list[str],
        layers: list[int] | None = None,
    ):
        from peft import LoraConfig, inject_adapter_in_model

        self.base_model = base_model
        self.adapter_name = f"graftlm_{adapter_name}"
        peft_config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
            layers_to_transform=layers, bias="none",
        )
        self._had_peft_config = "peft_config" in base_model.__dict__
        inject_adapter_in_model(peft_config, base_model, adapter_name=self.adapter_name)
        with torch.no_grad():  # float32 on a bf16 base (graftlm.dtype_policy); peft casts the output back
            for parameter in self.parameters():
                parameter.data = parameter.data.to(parameter_dtype(parameter.dtype))

    def tuner_layers(self) -> list[tuple[nn.Module, str, nn.Module]]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        found = []
        for parent in self.base_model.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, BaseTunerLayer) and self.adapter_name in child.lora_A:
                    found.append((parent, child_name, child))
        return found

    def parameters(self) -> list[nn.Parameter]:
        return list(self._named_parameters().values())

    def tensor_paths(self) -> dict[str, str]:
        """Each LoRA tensor's key (its module path, the internal adapter name stripped) -> that parameter's
        name in the base model's own state dict."""
        marker = f".{self.adapter_name}."
        return {name.replace(marker, "."): name for name, _ in self.base_model.named_parameters() if marker in name}

    def _named_parameters(self) -> dict[str, nn.Parameter]:
        parameters = dict(self.base_model.named_parameters())
        return {key: parameters[name] for key, name in self.tensor_paths().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA tensors keyed by their module path, with the internal adapter name stripped."""
        return {name: p.detach() for name, p in self._named_parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parameters = self._named_parameters()
        with torch.no_grad():
            for name, value in state.items():
                parameters[name].copy_(value)

    def set_active(self, active: bool) -> None:
        for _, _, layer in self.tuner_layers():
            layer.enable_adapters(active)

    def remove(self) -> None:
        for parent, child_name, layer in self.tuner_layers():
            setattr(parent, child_name, layer.get_base_layer())
        configs = self.base_model.__dict__.get("peft_config")
        if isinstance(configs, dict):  # the record peft's inject_adapter_in_model leaves on the base
            configs.pop(self.adapter_name, None)
            if not configs and not self._had_peft_config:
                del self.base_model.__dict__["peft_config"]


@dataclass
class LoRAConfig(GraftConfig):
    """Plain LoRA on the frozen base (via peft), the matched-budget baseline for every graft."""

    graft_type = "lora"

    r: int = field(default=8, metadata={"help": "LoRA rank.", "min": 1})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r).", "gt": 0.0})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input.", "min": 0.0, "lt": 1.0})
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "Names of the base model's Linear modules to adapt (peft target_modules; a single name "
                          "is a one-item list, not a regular expression).", "non_empty": True},
    )


class LoRAGraft(Graft):
    """A graft whose only parameters are peft LoRA matrices inside the base model."""

    def install(self) -> None:
        config = self.config
        layers = None if config.target_layers is None else self.layer_indices
        self.attach_lora(config.r, config.alpha, config.target_modules, config.dropout, layers)


register_graft(LoRAConfig, LoRAGraft)
