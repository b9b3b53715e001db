"""One generation cache for every graft (`graftlm.adapters.graft_cache.GraftCache`): SST, Attractor, Echo and
range search stacked on tiny Llama / Gemma 3 models generate with every graft's state in the one cache, beam
search scores beams as the model's own full forward does, crop goes back exactly where it can and is
refused by name where it can't, and clashing cache layers are refused at attach time."""

import itertools
import warnings
from unittest import mock

import pytest
import torch
from graft_fixtures import build_tiny_model, open_grafts

from graftlm.adapters import (
    AttractorConfig,
    EchoConfig,
    RangeSearchConfig,
    SSTConfig,
    UnsupportedGenerationError,
    attach_adapter,
)
from graftlm.adapters.graft_cache import CacheCropError, GraftCache
from graftlm.patches.cache_kwarg import with_cache

FAMILIES = ["llama", "gemma3"]
PROMPT = torch.tensor([[3, 17, 42, 9, 77, 5, 120, 33, 8, 61, 14]])
NEW_TOKENS = 6


def configs(family: str) -> dict:
    """Each graft in its exact mode, sized for a tiny model; range search on the last (full-attention) layer
    with every key kept (budget 1: decode equals dense attention) but read through its index (no dense
    fallback, no minimum length), Echo in parallel mode on every layer."""
    last = 1 if family == "llama" else 2
    return {
        "sst": SSTConfig(prefill_mode="exact", blend_max=0.9, blend_init=0.5),
        "attractor": AttractorConfig(attn_heads=2, attn_head_dim=8, mlp_hidden=16, tol=1e-6, min_iter=0, max_iter=100),
        "echo": EchoConfig(rank=4, chunk_size=4),
        "range_search": RangeSearchConfig(mode="exact", budget=1.0, min_keys=0, window=2, n_sink=1, block_size=4,
                                          dense_fallback=1.0, target_layers=[last]),
    }


def stack(family: str, names) -> torch.nn.Module:
    """A tiny model with the grafts ``names`` attached in that order (adapter name = graft type), opened wide
    enough that each moves the log-probabilities by more than 1e-2 (SST: c = 0.5; the head's output
    projections at 10x `open_grafts`' draw, still contractive)."""
    model = build_tiny_model(family)
    for name in names:
        model = attach_adapter(model, configs(family)[name], adapter_name=name)
    open_grafts(model)
    if "sst" in model.grafts:
        model.grafts["sst"].set_blend(0.5, gate=1.0)
    if "attractor" in model.grafts:
        with torch.no_grad():
            for block in model.grafts["attractor"].head.blocks:
                block.o_proj.weight.mul_(10.0)
                block.down_proj.weight.mul_(10.0)
    return model


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def assert_states_written(model, cache: GraftCache, length: int, decode_steps: int) -> None:
    """Each graft's state in ``cache`` was written by the forwards that filled ``length`` positions."""
    assert isinstance(cache, GraftCache) and set(cache.graft_states) == set(model.grafts)
    for name, graft in model.grafts.items():
        state = cache.state(name)
        if name == "sst":
            assert sorted(state.states) == graft.layer_indices
            assert all(s.abs().sum() > 0 for s in state.states.values())
        elif name == "attractor":
            assert state.length == length and len(state.iterations) == 1 + decode_steps
            assert sum(state.tokens) == length
        elif name == "echo":
            assert all(layer.is_initialized for layer in state.layers.values())
            assert all(layer.seen.tolist() == [length] * layer.seen.shape[0] for layer in state.layers.values())
        else:
            assert all(layer.n_queries == decode_steps and layer.index.n_keys == length
                       for layer in state.layers.values())


COMBINATIONS = [list(pair) for pair in itertools.combinations(["sst", "attractor", "echo", "range_search"], 2)]
COMBINATIONS.append(["sst", "attractor", "echo", "range_search"])


# -- greedy generation in a stack ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
def test_a_stack_generates_greedily_with_every_graft_state_in_one_cache(family, names):
    model = stack(family, names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    assert [str(w.message) for w in caught] == []  # no fallback warning (nor any other)
    length = out.sequences.shape[1] - 1
    assert_states_written(model, out.past_key_values, length, NEW_TOKENS - 1)
    full = logits(model, out.sequences)[:, PROMPT.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_by_hand_equal_the_full_forward_inside_the_stack(family):
    """All four on one `GraftModel.make_cache()`, each changing the output (but range search, exact at budget
    1 by design): prefill then one forward per token gives the full forward's logits."""
    names = ["sst", "attractor", "echo", "range_search"]
    model = stack(family, names)
    ids = torch.cat([PROMPT, PROMPT[:, :5] + 1], dim=1)
    full = logits(model, ids)
    for name in ("sst", "attractor", "echo"):
        model.grafts[name].active = False
        assert not torch.allclose(logits(model, ids), full, atol=1e-4), f"{name} leaves the output unchanged"
        model.grafts[name].active = True
    cache = model.make_cache()
    steps = [logits(model, ids[:, :7], **with_cache({}, cache), use_cache=True)]
    for t in range(7, ids.shape[1]):
        steps.append(logits(model, ids[:, t:t + 1], **with_cache({}, cache), use_cache=True))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-4, rtol=1e-4)
    assert_states_written(model, cache, ids.shape[1], ids.shape[1] - 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_sst_two_pass_prefill_nested_in_a_stack_leaves_the_other_grafts_runs_alone(family):
    """SST's default two-pass prefill runs the whole model once more inside its hook; the Attractor (hooked
    on the same top-level forward, attached first) and Echo keep their own forward's run and state."""
    model = build_tiny_model(family)
    for name, config in [("attractor", configs(family)["attractor"]), ("echo", configs(family)["echo"]),
                         ("sst", SSTConfig(blend_max=0.9, blend_init=0.5))]:
        model = attach_adapter(model, config, adapter_name=name)
    open_grafts(model)
    with torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    torch.testing.assert_close(out.logits[0], logits(model, PROMPT)[:, -1], atol=2e-4, rtol=1e-4)
    assert_states_written(model, out.past_key_values, out.sequences.shape[1] - 1, 3)


# -- beam search ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("names", [["sst"], ["attractor"], ["echo"], ["range_search"],
                                   ["sst", "attractor", "echo", "range_search"]], ids="+".join)
def test_beam_search_scores_each_beam_as_the_full_forward_does(family, names):
    model = stack(family, names)
    prompt = PROMPT[:, :6]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, num_beams=2,
                             num_return_sequences=2, do_sample=False, length_penalty=0.0, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert not torch.equal(out.sequences[0], out.sequences[1])
    for sequence, score in zip(out.sequences, out.sequences_scores):
        log_probs = logits(model, sequence[None]).log_softmax(-1)[0, prompt.shape[1] - 1:-1]
        own = log_probs.gather(-1, sequence[prompt.shape[1]:, None]).sum()
        torch.testing.assert_close(own, score, atol=5e-4, rtol=0)
    assert isinstance(out.past_key_values, GraftCache) and set(out.past_key_values.graft_states) == set(names)


def test_reorder_gathers_every_graft_state_row():
    model = stack("llama", ["sst", "attractor", "echo", "range_search"])
    cache = model.make_cache()
    batch = torch.cat([PROMPT, PROMPT.flip(1)])
    logits(model, batch, **with_cache({}, cache), use_cache=True)
    logits(model, batch[:, :1], **with_cache({}, cache), use_cache=True)  # builds the range-search index
    sst, attractor, echo = (cache.state(k) for k in ("sst", "attractor", "echo"))
    before = (dict(sst.states), [kv for kv in attractor.kv], {i: layer.state.gram for i, layer in echo.layers.items()},
              list(attractor.iterations))
    cache.reorder_cache(torch.tensor([1, 1]))
    assert all(torch.equal(sst.states[i], before[0][i][[1, 1]]) for i in sst.states)
    assert all(torch.equal(k, k0[[1, 1]]) and torch.equal(v, v0[[1, 1]])
               for (k, v), (k0, v0) in zip(attractor.kv, before[1]))
    assert all(torch.equal(layer.state.gram, before[2][i][[1, 1]]) for i, layer in echo.layers.items())
    assert all(layer.index is None for layer in cache.state("range_search").layers.values())  # rebuilt next step
    assert all(torch.equal(it, it0[[1, 1]]) for it, it0 in zip(attractor.iterations, before[3]))


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_after_reorder_repeat_and_select_continues_the_rows_it_picked(family):
    """All four stacked: rows regathered (reorder), repeated or selected in the cache, then decoded, give the
    full forward of the sequences those rows now hold."""
    model = stack(family, ["sst", "attractor", "echo", "range_search"])
    prompts = torch.cat([PROMPT, PROMPT.flip(1)])
    step = torch.tensor([[7], [9]])

    def continued(cache, rows):
        decoded = logits(model, step, **with_cache({}, cache), use_cache=True)[:, -1]
        full = logits(model, torch.cat([prompts[rows], step], dim=1))[:, -1]
        torch.testing.assert_close(decoded, full, atol=2e-4, rtol=1e-4)

    for rearrange, rows in [(lambda c: c.reorder_cache(torch.tensor([1, 1])), [1, 1]),
                            (lambda c: c.batch_select_indices(torch.tensor([1, 0])), [1, 0])]:
        cache = model.make_cache()
        logits(model, prompts, **with_cache({}, cache), use_cache=True)
        rearrange(cache)
        continued(cache, rows)
    cache = model.make_cache()
    logits(model, prompts[1:], **with_cache({}, cache), use_cache=True)
    cache.batch_repeat_interleave(2)
    continued(cache, [1, 1])


# -- crop ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_crop_goes_back_exactly_for_sst_attractor_and_range_search(family):
    """Decode 4 tokens, crop 3 of them, decode 3 others: the logits are the full forward's of the sequence
    that was kept (SST records its states once past recording is on, as transformers turns it on)."""
    model = stack(family, ["sst", "attractor", "range_search"])
    cache = model.make_cache()
    logits(model, PROMPT, **with_cache({}, cache), use_cache=True)
    cache.activate_past_recording()
    for token in (5, 6, 7, 8):
        logits(model, torch.tensor([[token]]), **with_cache({}, cache), use_cache=True)
    cache.crop(-3)
    assert cache.get_seq_length() == PROMPT.shape[1] + 1 and cache.state("attractor").length == PROMPT.shape[1] + 1
    tail = [logits(model, torch.tensor([[token]]), **with_cache({}, cache), use_cache=True) for token in (40, 41, 42)]
    kept = torch.cat([PROMPT, torch.tensor([[5, 40, 41, 42]])], dim=1)
    torch.testing.assert_close(torch.cat(tail, 1), logits(model, kept)[:, -3:], atol=2e-4, rtol=1e-4)
    assert cache.state("attractor").tokens == [PROMPT.shape[1], 1, 1, 1, 1]


def test_crop_is_refused_by_name_where_a_state_cannot_go_back():
    model = stack("llama", ["sst", "echo"])
    cache = model.make_cache()
    logits(model, PROMPT, **with_cache({}, cache), use_cache=True)
    length = cache.get_seq_length()
    with pytest.raises(CacheCropError, match=r"sst: SST keeps only the last position's state.*echo: the Echo "
                                             r"statistics are sums"):
        cache.crop(-1)
    assert cache.get_seq_length() == length and not cache.is_croppable  # nothing was cut
    cache.crop(0)  # transformers' trim: no token removed, allowed


@pytest.mark.parametrize("family", FAMILIES)
def test_assisted_generation_equals_greedy_where_every_state_crops_and_is_refused_for_echo(family):
    """Prompt lookup drafts tokens that the model then verifies; rejected drafts are cropped off the cache
    (every graft's state with it), so the tokens and their logits are greedy decoding's."""
    model = stack(family, ["sst", "attractor", "range_search"])
    prompt = torch.cat([PROMPT, PROMPT], dim=1)  # repeats, so prompt lookup drafts tokens
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0,
              "output_logits": True, "return_dict_in_generate": True}
    crops = []
    original = GraftCache.crop

    def counted(cache, tokens_to_remove):
        crops.append(tokens_to_remove)
        original(cache, tokens_to_remove)

    with torch.no_grad():
        greedy = model.generate(prompt, **kwargs)
        with mock.patch.object(GraftCache, "crop", counted):
            assisted = model.generate(prompt, prompt_lookup_num_tokens=3, **kwargs)
    assert any(crops), "no draft was rejected: the test would not crop"
    assert torch.equal(assisted.sequences, greedy.sequences)
    torch.testing.assert_close(torch.stack(assisted.logits, 1), torch.stack(greedy.logits, 1), atol=2e-4, rtol=1e-4)
    echo = stack(family, ["echo"])
    with pytest.raises(UnsupportedGenerationError, match=r"assisted generation \(prompt_lookup_num_tokens\) is "
                                                         r"not supported with the graft 'echo' \(echo\)"):
        echo.generate(prompt, prompt_lookup_num_tokens=3, max_new_tokens=2, pad_token_id=0)


# -- caches that don't hold a graft's state ------------------------------------------------------------------
def test_a_cache_built_before_a_graft_was_attached_is_refused_by_that_graft():
    model = stack("llama", ["echo"])
    early = model.make_cache()
    model = attach_adapter(model, configs("llama")["sst"], adapter_name="sst")
    with pytest.raises(RuntimeError, match="the SST graft continues a sequence only from a cache holding its state"):
        logits(model, PROMPT, **with_cache({}, early), use_cache=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cache_the_model_made_itself_carries_the_sst_and_attractor_states(family):
    """``model(ids, use_cache=True)`` without a cache: transformers makes a plain one, and SST and the Attractor
    keep their states on it, so continuing from ``out.past_key_values`` is exact (greedy use)."""
    model = stack(family, ["sst", "attractor"])
    ids = torch.cat([PROMPT, PROMPT[:, :3] + 1], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids[:, :-3], use_cache=True)
        steps = [out.logits]
        for t in range(ids.shape[1] - 3, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], **with_cache({}, out.past_key_values), use_cache=True)
            steps.append(out.logits)
    assert not isinstance(out.past_key_values, GraftCache)
    torch.testing.assert_close(torch.cat(steps, 1), logits(model, ids), atol=2e-4, rtol=1e-4)


def test_beam_search_with_a_plain_cache_is_refused():
    from transformers import DynamicCache

    model = stack("llama", ["sst"])
    with pytest.raises(UnsupportedGenerationError, match="DynamicCache as the cache: its reorder does not reach"):
        model.generate(PROMPT, max_new_tokens=2, num_beams=2, pad_token_id=0,
                       **with_cache({}, DynamicCache(config=model.config)))


# -- cache layers that clash ------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["echo first", "range search first"])
def test_range_search_on_a_layer_echo_replaces_is_refused_at_attach(order):
    echo = ("echo", EchoConfig(mode="replace", window=3, chunk_size=4, target_layers=[1]))
    search = ("search", RangeSearchConfig(target_layers=[1]))
    first, second = (echo, search) if order == "echo first" else (search, echo)
    model = attach_adapter(build_tiny_model("llama"), first[1], adapter_name=first[0])
    with pytest.raises(ValueError, match=r"on layers \[1\] .*reads the whole key cache that .*replaces"):
        attach_adapter(model, second[1], adapter_name=second[0])
    assert list(model.grafts) == [first[0]]
    attach_adapter(model, RangeSearchConfig(target_layers=[0]) if order == "echo first" else
                   EchoConfig(mode="replace", window=3, chunk_size=4, target_layers=[0]), adapter_name=second[0])


def test_two_grafts_replacing_one_layers_cache_are_refused_at_attach():
    from graft_fixtures import FFNBiasConfig, FFNBiasGraft

    model = attach_adapter(build_tiny_model("llama"), EchoConfig(mode="replace", window=3, chunk_size=4,
                                                                 target_layers=[1]), adapter_name="echo")
    message = r"cannot attach 'bias' \(test_ffn_bias\) beside 'echo' \(echo\): on layers \[1\] both replace the"
    with (mock.patch.object(FFNBiasGraft, "cache_layers_replaced", lambda self: {0, 1}),
          pytest.raises(ValueError, match=message)):
        attach_adapter(model, FFNBiasConfig(), adapter_name="bias")
    assert list(model.grafts) == ["echo"]


@pytest.mark.parametrize("family", FAMILIES)
def test_echo_replace_and_range_search_on_other_layers_decode_like_the_full_forward(family):
    """Echo replaces layer 0's attention by its window (the cache keeps only the window there), range search
    indexes the last layer: whichever is attached first, each layer keeps its own graft's attention."""
    last = 1 if family == "llama" else 2
    for order in ([0, 1], [1, 0]):
        model = build_tiny_model(family)
        specs = [("echo", EchoConfig(mode="replace", window=3, chunk_size=4, target_layers=[0])),
                 ("range_search", configs(family)["range_search"])]
        for i in order:
            model = attach_adapter(model, specs[i][1], adapter_name=specs[i][0])
        open_grafts(model)
        with torch.no_grad():
            out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        cache = out.past_key_values
        held = 2 + model.grafts["echo"].sinks[0]  # window - 1, and the sink tokens (none on a sliding layer)
        assert cache.layers[0].keys.shape[-2] == held and cache.layers[last].keys.shape[-2] == out.sequences.shape[1] - 1
        assert all(layer.n_queries == NEW_TOKENS - 1 for layer in cache.state("range_search").layers.values())
        full = logits(model, out.sequences)[:, PROMPT.shape[1] - 1:-1]
        torch.testing.assert_close(torch.stack(out.logits, 1), full, atol=2e-4, rtol=1e-4)
