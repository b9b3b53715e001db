"""Tiny random Llama / Gemma 3 models and test-only grafts that exercise the attach/save/load machinery."""

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from graftlm.adapters import Graft, GraftConfig, register_graft
from graftlm.testing import generation_cache, open_grafts  # noqa: F401  (re-exported for the tests)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """Imports ``benchmarks/<name>.py`` (not a package) as module ``<name>``, registered in sys.modules so that
    its dataclasses can look their module up."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    values = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256, "sliding_window": 8,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, "query_pre_attn_scalar": 16,
    }
    values.update(overrides)
    return Gemma3TextConfig(**values)


def build_tiny_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random ``LlamaForCausalLM`` or ``Gemma3ForCausalLM`` in fp32 eval mode (SDPA attention)."""
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(tiny_llama_config(**overrides))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(tiny_gemma3_config(**overrides))
    else:
        raise ValueError(family)
    model.config._attn_implementation = "sdpa"
    model.config._name_or_path = f"tiny-{family}"
    return model.eval()


def build_byte_tokenizer():
    """Returns a byte-level ``PreTrainedTokenizerFast`` (256 byte tokens + <pad>, <s>, </s>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_byte_model(directory, family: str = "llama", seed: int = 0):
    """A tiny random model with the byte tokenizer saved as a Hugging Face directory (for `load_model`)."""
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(family, seed, vocab_size=len(tokenizer), max_position_embeddings=512)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# -- a test-only graft: zero-initialised per-channel biases on the FFN and attention outputs --------
@dataclass
class FFNBiasConfig(GraftConfig):
    """Test graft: adds a learned per-layer bias to the FFN output (zero init = exact base)."""

    graft_type = "test_ffn_bias"
    scale: float = field(default=1.0, metadata={"help": "Multiplier on the bias."})


class FFNBiasGraft(Graft):
    def __init__(self, config, base_model, patch):
        super().__init__(config, base_model, patch)
        d = base_model.config.hidden_size
        self.bias = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(d)) for i in self.layer_indices})

    def install(self):
        layers = self.patch.decoder_layers(self.base_model)
        for i in self.layer_indices:
            module = self.patch.ffn_output_module(layers[i])
            self.add_hook(module.register_forward_hook(self._make_hook(str(i))))

    def _make_hook(self, key):
        def hook(module, args, output):
            if not self.active:
                return output
            return output + self.config.scale * self.bias[key]

        return hook


@dataclass
class AttnBiasConfig(GraftConfig):
    """Second test graft (a different kind) for stacking: a bias on the attention output."""

    graft_type = "test_attn_bias"


class AttnBiasGraft(Graft):
    def __init__(self, config, base_model, patch):
        super().__init__(config, base_model, patch)
        self.bias = nn.Parameter(torch.zeros(len(self.layer_indices), base_model.config.hidden_size))

    def install(self):
        layers = self.patch.decoder_layers(self.base_model)
        for row, i in enumerate(self.layer_indices):
            attention = self.patch.attention(layers[i])
            self.add_hook(attention.register_forward_hook(self._make_hook(row)))

    def _make_hook(self, row):
        def hook(module, args, output):
            if not self.active:
                return output
            attn_output, weights = output
            return attn_output + self.bias[row], weights

        return hook


@dataclass
class FFNScaleConfig(GraftConfig):
    """Third test graft: scales the FFN output by (1 + s) per channel (zero init = exact base). On the same
    module as `FFNBiasGraft` and not commuting with it, so the stacking order changes the logits."""

    graft_type = "test_ffn_scale"


class FFNScaleGraft(Graft):
    def __init__(self, config, base_model, patch):
        super().__init__(config, base_model, patch)
        self.scale = nn.Parameter(torch.zeros(len(self.layer_indices), base_model.config.hidden_size))

    def install(self):
        layers = self.patch.decoder_layers(self.base_model)
        for row, i in enumerate(self.layer_indices):
            module = self.patch.ffn_output_module(layers[i])
            self.add_hook(module.register_forward_hook(self._make_hook(row)))

    def _make_hook(self, row):
        def hook(module, args, output):
            if not self.active:
                return output
            return output * (1 + self.scale[row])

        return hook


register_graft(FFNBiasConfig, FFNBiasGraft)
register_graft(AttnBiasConfig, AttnBiasGraft)
register_graft(FFNScaleConfig, FFNScaleGraft)


def build_char_tokenizer():
    """An offline character-level tokenizer whose ids fit the tiny models' 128-token vocabulary."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    symbols = specials + list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def graft_gradients(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Fresh gradients of every trainable graft parameter for the LM loss of ``ids`` (the model's own mode)."""
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in model.graft_parameters()]
