"""The cache's kwarg name across transformers versions (``cache`` from 5.24, ``past_key_values`` before)."""

import inspect

import torch
from graft_fixtures import build_tiny_model
from transformers import DynamicCache, LlamaModel

from graftlm.patches.cache_kwarg import cache_from_kwargs, cache_from_output, cache_kwarg, with_cache


def test_cache_kwarg_is_the_name_the_installed_transformers_takes():
    assert cache_kwarg() in inspect.signature(LlamaModel.forward).parameters


def test_either_name_is_read_and_the_installed_name_is_written():
    cache = DynamicCache()
    assert cache_from_kwargs({"cache": cache}) is cache
    assert cache_from_kwargs({"past_key_values": cache}) is cache
    assert cache_from_kwargs({"past_key_values": None, "use_cache": True}) is None
    written = with_cache({"past_key_values": None, "cache": None, "max_new_tokens": 3}, cache)
    assert written == {"max_new_tokens": 3, cache_kwarg(): cache}


def test_the_cache_of_a_forward_is_found_on_its_output_and_in_the_layers_hook_kwargs():
    model = build_tiny_model("llama")
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(cache_from_kwargs(kwargs)), with_kwargs=True)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert isinstance(cache_from_output(out), DynamicCache)
    assert seen == [cache_from_output(out)]
