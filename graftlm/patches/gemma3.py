"""Gemma 3 text decoders (``Gemma3ForCausalLM``), with their two extra norms per layer.

Layer: ``x -> input_layernorm -> self_attn -> post_attention_layernorm -> + x = h;
h -> pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm -> + h``.
Layers alternate sliding-window (``sliding_attention``) and global (``full_attention``) attention;
``layer_types`` in the config says which is which.
"""

from graftlm.patches.base import ArchitecturePatch


class Gemma3Patch(ArchitecturePatch):
    family = "gemma3"
    model_types = ("gemma3_text",)
    ffn_input_norm_name = "pre_feedforward_layernorm"
    attn_output_norm_name = "post_attention_layernorm"
    ffn_output_norm_name = "post_feedforward_layernorm"
