"""Hook points of a decoder-only architecture: *where* a graft attaches, never *what* it does.

A decoder layer of the supported families computes (METHODS.md, notation)::

    x -> input_layernorm -> self_attn -> [attn_output_norm] -> + x = h
    h -> ffn_input_norm -> mlp -> [ffn_output_norm] -> + h

`ArchitecturePatch` names those modules for one family. Grafts attach through forward hooks (with
kwargs) on these modules or through the attention registry, so the base model's own ``forward`` code
is never replaced. Hooks registered on modules re-run when gradient checkpointing recomputes a layer,
and see the same cache (`cache_kwarg`) in prefill and in one-token decode steps.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class ArchitecturePatch:
    """Hook points of one architecture family. Subclasses set the class attributes."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    ffn_input_norm_name: str = ""
    attn_output_norm_name: str | None = None
    ffn_output_norm_name: str | None = None

    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack (``model.model`` for ``*ForCausalLM``)."""
        return model.get_decoder()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def embeddings(self, model: nn.Module) -> nn.Module:
        return model.get_input_embeddings()

    def attention(self, layer: nn.Module) -> nn.Module:
        """The self-attention module; its forward returns ``(attn_output [B, T, d], weights)``."""
        return layer.self_attn

    def attention_output_projection(self, layer: nn.Module) -> nn.Module:
        """The attention's output projection (``o_proj``: heads [B, T, H*Dh] -> [B, T, d])."""
        return self.attention(layer).o_proj

    def attention_output_norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm applied to the attention output before the residual add (Gemma), else None."""
        return getattr(layer, self.attn_output_norm_name) if self.attn_output_norm_name else None

    def ffn_input_norm(self, layer: nn.Module) -> nn.Module:
        """The norm whose input is the residual stream h after attention, the FFN's input [B, T, d]."""
        return getattr(layer, self.ffn_input_norm_name)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def ffn_output_norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm applied to the FFN output before the residual add (Gemma), else None."""
        return getattr(layer, self.ffn_output_norm_name) if self.ffn_output_norm_name else None

    def ffn_output_module(self, layer: nn.Module) -> nn.Module:
        """The last module of the FFN branch: its output is what the layer adds to the residual."""
        return self.ffn_output_norm(layer) or self.mlp(layer)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.get_output_embeddings()

    def layer_types(self, model: nn.Module) -> list[str]:
        """Per layer: ``full_attention`` or ``sliding_attention``."""
        config = model.config
        types = getattr(config, "layer_types", None)
        return list(types) if types else ["full_attention"] * config.num_hidden_layers

    def register_attention(self, name: str, attention_fn: Callable, mask_fn: Callable | None = None) -> None:
        """Register an attention implementation under ``name`` together with its mask function.

        transformers looks the mask function up under the same name; without one it silently drops the
        mask, so the default is the SDPA mask (boolean, causal, with padding and sliding windows).
        """
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(name, attention_fn)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn or sdpa_mask)

    def unregister_attention(self, name: str) -> None:
        """Remove an implementation registered with `register_attention` (and its mask function)."""
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface._global_mapping.pop(name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)

    def set_attention_implementation(self, model: nn.Module, name: str) -> str:
        """Switch the model to a registered attention implementation; returns the previous one."""
        previous = model.config._attn_implementation
        model.set_attn_implementation(name)
        return previous

    def describe(self, model: nn.Module) -> dict:
        config = model.config
        return {
            "family": self.family,
            "model_type": config.model_type,
            "architecture": type(model).__name__,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        }
