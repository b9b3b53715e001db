"""Llama-shaped decoders: Llama, SmolLM (Llama weights), Mistral, Qwen2.

Layer: ``x -> input_layernorm -> self_attn -> + x = h;  h -> post_attention_layernorm -> mlp -> + h``.
The norm called ``post_attention_layernorm`` is the FFN's input norm.
"""

from graftlm.patches.base import ArchitecturePatch


class LlamaPatch(ArchitecturePatch):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    ffn_input_norm_name = "post_attention_layernorm"
