"""The range-search graft (METHODS.md section 4) on tiny random Llama / Gemma 3 models and on real keys."""

import math

import pytest
import torch
from graft_fixtures import FFNBiasConfig, build_tiny_model
from safetensors.torch import load_file
from transformers import AttentionInterface, DynamicCache

import graftlm
from graftlm.adapters import RangeSearchConfig, attach_adapter
from graftlm.adapters.io import WEIGHTS_NAME
from graftlm.adapters.range_search import forced_keys, range_search_decode
from graftlm.adapters.range_search_cache import RangeSearchCache
from graftlm.host_syncs import HostSyncCounter
from graftlm.kernels.range_search import KeyReservoir, RangeSearchIndex, exact_scores, halfspace_mask
from graftlm.patches.cache_kwarg import cache_from_kwargs, cache_kwarg

PROMPT = torch.tensor([[3, 17, 42, 9, 77, 5, 120, 33, 8, 61, 14, 90, 27, 64, 11, 38, 99, 52, 7, 45, 81, 23, 70]])
NEW_TOKENS = 9
FAMILIES = ["llama", "gemma3"]


def small_graft(**overrides):
    """Exact-mode settings that make the index matter on a tiny model: short window, one sink, no min_keys,
    no dense fallback (so every step goes through the tree)."""
    values = {"mode": "exact", "budget": 0.2, "min_keys": 0, "window": 2, "n_sink": 1, "block_size": 4,
              "track_recall": True, "dense_fallback": 1.0}
    values.update(overrides)
    return RangeSearchConfig(**values)


def greedy(model, ids=PROMPT, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def forward_logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(input_ids=ids).logits


def graft_of(model):
    return model.grafts["default"]


# -- exactness -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attach_reproduces_base_logits_exactly(family):
    base = build_tiny_model(family)
    before = forward_logits(base)
    model = attach_adapter(base, small_graft())
    assert torch.equal(forward_logits(model), before)  # prefill is dense, through the same SDPA call


@pytest.mark.parametrize("threshold", ["budget", "reservoir"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_generation_equals_dense(family, threshold):
    base = build_tiny_model(family)
    dense_ids, dense_logits = greedy(base)
    model = attach_adapter(base, small_graft(budget=1.0, threshold=threshold))
    cache = graft_of(model).make_cache()
    ids, decode_logits = greedy(model, past_key_values=cache)
    assert torch.equal(ids, dense_ids)
    torch.testing.assert_close(decode_logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert all(state.n_queries == NEW_TOKENS - 1 for state in cache.range_search.values())
    assert all(r["mass_recall"] == pytest.approx(1.0, abs=1e-6) for r in graft_of(model).recall_log)


@pytest.mark.parametrize("threshold", ["budget", "reservoir"])
@pytest.mark.parametrize("family", FAMILIES)
def test_small_budget_decodes_through_the_index_exactly(family, threshold):
    model = attach_adapter(build_tiny_model(family), small_graft(threshold=threshold))
    graft = graft_of(model)
    cache = graft.make_cache()
    ids, _ = greedy(model, past_key_values=cache)
    assert ids.shape[1] == PROMPT.shape[1] + NEW_TOKENS
    for layer_idx, state in cache.range_search.items():
        assert isinstance(state.index, RangeSearchIndex) and state.n_queries == NEW_TOKENS - 1
        last = state.last
        n = last["n_keys"]
        keys = cache.layers[layer_idx].keys[:, :, :n]
        assert state.index.n_keys == n
        brute = halfspace_mask(last["q"], keys, last["tau"])
        assert torch.equal(state.index.search(last["q"], last["tau"], keys), brute)
        forced = forced_keys(None, 1, n, graft.config.n_sink, graft.config.window, keys.device)
        assert torch.equal(last["attended"], brute | forced[:, None, :])
        assert last["attended"].float().mean() < 0.6  # the budget really prunes
    log = graft.recall_log
    assert len(log) == (NEW_TOKENS - 1) * len(cache.range_search)
    assert all(r["threshold_recall"] == 1.0 for r in log)
    assert all(0 < r["mass_recall"] <= 1 + 1e-6 for r in log)


def test_gemma_sliding_layers_stay_dense():
    base = build_tiny_model("gemma3")
    model = attach_adapter(base, small_graft(target_layers=[0, 1, 2]))
    graft = graft_of(model)
    assert graft.layer_indices == [2]
    decoded_layers = []
    original = graft._decode
    graft._decode = lambda layer_idx, *args: decoded_layers.append(layer_idx) or original(layer_idx, *args)
    cache = graft.make_cache()
    greedy(model, past_key_values=cache)
    assert set(decoded_layers) == {2} and set(cache.range_search) == {2}
    assert cache.layers[0].is_sliding and not cache.layers[2].is_sliding


@pytest.mark.parametrize("config", [{"budget": 1.0}, {"budget": 0.25, "threshold": "budget", "n_sink": 2}],
                         ids=["full", "budget"])
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_unpadded_rows(family, config):
    """Padded keys are excluded and each row's sinks are its first REAL tokens, so a left-padded row
    attends exactly the keys it attends unpadded (the exact-budget tau is computed over real keys)."""
    model = attach_adapter(build_tiny_model(family), small_graft(**config))
    rows = [PROMPT[0, :15], PROMPT[0, 4:]]
    width = max(len(r) for r in rows)
    pad = model.config.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    batch_ids, batch_logits = greedy(model, ids, attention_mask=mask, pad_token_id=pad)
    for i, row in enumerate(rows):
        alone_ids, alone_logits = greedy(model, row[None], pad_token_id=pad)
        assert torch.equal(batch_ids[i, width:], alone_ids[0, len(row):])
        torch.testing.assert_close(batch_logits[i], alone_logits[0], atol=1e-4, rtol=1e-4)


def test_forced_keys_put_sinks_on_first_real_tokens():
    key_mask = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    forced = forced_keys(key_mask, 2, 7, n_sink=2, n_window=1, device="cpu")
    assert forced.tolist() == [[False, False, True, True, False, False, True],
                               [True, True, False, False, False, False, True]]


# -- lifecycle -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_attention_implementation_and_logits(family):
    base = build_tiny_model(family)
    before_logits, before_ids = forward_logits(base), greedy(base)[0]
    model = attach_adapter(base, small_graft())
    name = graft_of(model)._attention_name
    assert base.config._attn_implementation == name and name in AttentionInterface._global_mapping
    greedy(model)
    restored = model.detach()
    assert restored.config._attn_implementation == "sdpa"
    assert name not in AttentionInterface._global_mapping
    assert torch.equal(forward_logits(restored), before_logits)
    assert torch.equal(greedy(restored)[0], before_ids)
    assert all(len(m._forward_pre_hooks) + len(m._forward_hooks) == 0 for m in restored.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_adapter_is_dense_sdpa(family):
    base = build_tiny_model(family)
    dense_ids, dense_logits = greedy(base)
    model = attach_adapter(base, small_graft(budget=0.05))
    with model.disable_adapter():
        ids, logits = greedy(model, past_key_values=graft_of(model).make_cache())
    assert torch.equal(ids, dense_ids) and torch.equal(logits, dense_logits)
    assert graft_of(model).recall_log == []


def test_foreign_cache_stays_dense_with_a_warning():
    base = build_tiny_model("llama")
    dense_ids, dense_logits = greedy(base)
    model = attach_adapter(base, small_graft(budget=0.05))
    with pytest.warns(UserWarning, match="stays dense"):
        ids, logits = greedy(model, past_key_values=DynamicCache(config=base.config))
    assert torch.equal(ids, dense_ids) and torch.equal(logits, dense_logits)


def test_generate_supplies_a_range_search_cache():
    model = attach_adapter(build_tiny_model("llama"), small_graft())
    kwargs = graft_of(model).prepare_generate_kwargs({"max_new_tokens": 2})
    assert isinstance(kwargs[cache_kwarg()], RangeSearchCache)
    own = DynamicCache()
    for name in ("cache", "past_key_values"):  # the caller's cache under either transformers name is kept
        assert cache_from_kwargs(graft_of(model).prepare_generate_kwargs({name: own})) is own
    greedy(model)
    assert len(graft_of(model).recall_log) == (NEW_TOKENS - 1) * model.config.num_hidden_layers


def test_cache_reorder_drops_and_rebuilds_the_index():
    model = attach_adapter(build_tiny_model("llama"), small_graft())
    cache = graft_of(model).make_cache()
    greedy(model, past_key_values=cache)
    cache.reorder_cache(torch.tensor([0]))
    assert all(state.index is None for state in cache.range_search.values())
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]), past_key_values=cache)
    assert all(state.n_builds == 1 and state.index.n_keys == cache.get_seq_length() for state in cache.range_search.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trips_config_without_tensors(family, tmp_path):
    config = small_graft(budget=0.1, threshold="budget", window=3, target_layers=[-1])
    model = attach_adapter(build_tiny_model(family), config)
    ids, logits = greedy(model)
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / WEIGHTS_NAME) == {}
    loaded = attach_adapter(build_tiny_model(family), tmp_path)
    loaded_config = graft_of(loaded).config
    assert isinstance(loaded_config, RangeSearchConfig)
    assert {k: v for k, v in loaded_config.to_dict().items() if k != "inference_mode"} == \
           {k: v for k, v in config.to_dict().items() if k != "inference_mode"}
    loaded_ids, loaded_logits = greedy(loaded)
    assert torch.equal(loaded_ids, ids) and torch.equal(loaded_logits, logits)


def test_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="threshold"):
        RangeSearchConfig(threshold="topk")
    with pytest.raises(ValueError, match="backend"):
        RangeSearchConfig(backend="cuda")
    assert "budget" in RangeSearchConfig.field_help()


@pytest.mark.parametrize("family", FAMILIES)
def test_stacks_with_another_graft(family):
    base = build_tiny_model(family)
    model = attach_adapter(base, FFNBiasConfig())
    with torch.no_grad():
        for p in model.graft_parameters():
            p.add_(torch.randn(p.shape) * 0.5)
    biased_ids, biased_logits = greedy(model)
    attach_adapter(model, small_graft(budget=1.0), adapter_name="range")
    assert sorted(model.grafts) == ["default", "range"]
    ids, logits = greedy(model)
    assert torch.equal(ids, biased_ids)
    torch.testing.assert_close(logits, biased_logits, atol=1e-5, rtol=1e-5)
    assert len(model.grafts["range"].recall_log) > 0
    model.detach()


# -- real keys -----------------------------------------------------------------------------------------
REAL_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a notebook and "
    "a thermos of tea. From the gallery he could see the fishing boats returning to the harbour, the gulls "
    "circling above the breakwater and the long line of cliffs fading into the haze. He wrote down the wind "
    "direction, the state of the sea and the number of ships that passed, as his father and grandfather had "
    "done before him. In winter the storms came from the west and the waves broke over the rocks below with "
    "a sound like distant thunder; in summer the nights were short and the lamp burned for only a few hours. "
    "Visitors sometimes asked whether he was lonely. He would smile and point at the shelves of notebooks, "
    "forty years of weather and water, and say that the sea was never the same two days running, so how "
    "could anyone be lonely with such a companion. When the automatic light was finally installed, he kept "
    "climbing the stairs anyway, notebook in hand, because someone ought to be watching."
)


@pytest.mark.integration
def test_index_retrieval_is_exact_on_real_captured_keys():
    model, tokenizer = graftlm.load_model("smollm2-135m")
    ids = tokenizer(REAL_TEXT, return_tensors="pt").input_ids
    assert 200 <= ids.shape[1] <= 400
    cache = DynamicCache(config=model.config)
    queries = {}
    layer_idx = model.config.num_hidden_layers // 2
    attention = model.model.layers[layer_idx].self_attn

    def capture_query(module, args, kwargs):  # the rotated query of the last token, as decode would see it
        hidden = kwargs["hidden_states"][:, -1:]
        q = module.q_proj(hidden).view(1, 1, -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        queries["q"] = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])[0][:, :, 0]

    handle = attention.register_forward_pre_hook(capture_query, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    handle.remove()
    keys, q = cache.layers[layer_idx].keys, queries["q"]  # [1, 3, N, 64], [1, 9, 64]
    assert keys.shape[1] == 3 and q.shape[1] == 9
    prompt_keys = keys[:, :, :200]
    index = RangeSearchIndex.build(prompt_keys, block_size=32)
    index.append(keys[:, :, 200:])  # decode-style appends in blocks of 32, the rest left waiting
    scores = exact_scores(q, keys)
    for quantile in (0.5, 0.9, 0.98, 0.999):
        tau = torch.quantile(scores, quantile, dim=-1)
        assert torch.equal(index.search(q, tau, keys), halfspace_mask(q, keys, tau)), quantile
    tau = scores.amax(-1)  # exactly one key per head sits on the boundary
    assert torch.equal(index.search(q, tau, keys).sum(-1), torch.ones(1, 9, dtype=torch.long))
    assert index.search(q, torch.full((1, 9), math.inf), keys).sum() == 0


TRITON_ROUTE_CHECK = """
import torch
from graftlm.adapters.range_search import forced_keys, range_search_decode, range_search_decode
from graftlm.kernels.range_search import RangeSearchIndex, budget_threshold, exact_scores
torch.manual_seed(0)
keys, values, q = torch.randn(2, 1, 300, 16), torch.randn(2, 1, 300, 16), torch.randn(2, 4, 16)
key_mask = torch.ones(2, 300, dtype=torch.bool)
key_mask[0, :37] = False
index = RangeSearchIndex.build(keys[:, :, :256])
index.append(keys[:, :, 256:])
tau = budget_threshold(exact_scores(q, keys), 0.1, key_mask)  # tau sits exactly on a key's score
forced = forced_keys(key_mask, 2, 300, 4, 8, "cpu")
run = lambda backend: range_search_decode(q, keys, values, index, tau, forced=forced, key_mask=key_mask,
                                          scale=0.25, backend=backend)
torch.testing.assert_close(run("triton"), run("torch"), atol=1e-5, rtol=1e-5)
"""


def test_triton_route_matches_torch_route_under_interpreter():
    import os
    import subprocess
    import sys

    from graftlm.kernels.range_search import triton_available

    if not triton_available():
        pytest.skip("triton is not importable")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_ROUTE_CHECK], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


# -- block and certified modes (issue 19) ----------------------------------------------------------------
def block_graft(**overrides):
    """Block-mode settings that make the block index matter on a tiny model: blocks of 4 keys, flushes of 16,
    a window of 8, no dense fallback and no dense streak (every step goes through the plan)."""
    values = {"mode": "block", "mass_target": 0.9, "min_keys": 0, "window": 8, "n_sink": 2, "block_size": 16,
              "block_keys": 4, "cluster_keys": 32, "dense_fallback": 1.0, "recheck_every": 1, "track_recall": True}
    values.update(overrides)
    return RangeSearchConfig(**values)


LONG_PROMPT = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["block", "certified"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_modes_attach_exactly_and_equal_dense_when_nothing_is_pruned(family, mode):
    base = build_tiny_model(family)
    before = forward_logits(base, LONG_PROMPT)
    dense_ids, dense_logits = greedy(base, LONG_PROMPT)
    model = attach_adapter(base, block_graft(mode=mode, mass_target=1.0, tolerance=0.01, dense_fallback=0.0))
    assert torch.equal(forward_logits(model, LONG_PROMPT), before)
    ids, logits = greedy(model, LONG_PROMPT)
    assert torch.equal(ids, dense_ids)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert all(r["dense_fraction"] == 1.0 for r in graft_of(model).recall_log)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_mode_decodes_through_the_blocks(family):
    model = attach_adapter(build_tiny_model(family), block_graft())
    cache = graft_of(model).make_cache()
    greedy(model, LONG_PROMPT, past_key_values=cache)
    for state in cache.range_search.values():
        assert state.index.n_blocked > 0 and state.n_queries == NEW_TOKENS - 1
        last = state.last
        assert last["attended"].float().mean() < 1.0  # some blocks were left out
    log = graft_of(model).recall_log
    assert all(0 < r["mass_recall"] <= 1 + 1e-6 and r["dense_fraction"] == 0.0 for r in log)


@pytest.mark.parametrize("family", FAMILIES)
def test_certified_mode_keeps_its_bound(family):
    model = attach_adapter(build_tiny_model(family), block_graft(mode="certified", tolerance=0.2))
    greedy(model, LONG_PROMPT)
    log = graft_of(model).recall_log
    assert log and all(r["certified_bound"] <= 0.2 for r in log)
    assert all(r["mass_recall"] >= 1 - 0.2 - 1e-6 for r in log)  # the bound holds on the true mass


@pytest.mark.parametrize("family", FAMILIES)
def test_below_min_keys_the_graft_is_the_base_and_builds_no_index(family):
    base = build_tiny_model(family)
    dense_ids, dense_logits = greedy(base, LONG_PROMPT)
    longest = LONG_PROMPT.shape[1] + NEW_TOKENS
    model = attach_adapter(base, block_graft(min_keys=longest + 1))
    cache = graft_of(model).make_cache()
    ids, logits = greedy(model, LONG_PROMPT, past_key_values=cache)
    assert torch.equal(ids, dense_ids) and torch.equal(logits, dense_logits)  # the same SDPA call
    assert all(state.index is None and state.n_queries == 0 for state in cache.range_search.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_graft_takes_over_once_the_cache_reaches_min_keys(family):
    model = attach_adapter(build_tiny_model(family), block_graft(min_keys=LONG_PROMPT.shape[1] + 5))
    cache = graft_of(model).make_cache()
    greedy(model, LONG_PROMPT, past_key_values=cache)
    # decode step k (1..8) attends 90 + k keys: steps 5-8 reach min_keys = 95
    assert all(state.n_queries == 4 and state.n_builds == 1 for state in cache.range_search.values())


def test_a_layer_that_cannot_prune_backs_off_the_plan_and_stays_dense():
    base = build_tiny_model("llama")
    dense_ids, dense_logits = greedy(base, LONG_PROMPT)
    model = attach_adapter(base, block_graft(dense_fallback=0.0, recheck_every=2, recheck_max=4))
    cache = graft_of(model).make_cache()
    ids, logits = greedy(model, LONG_PROMPT, past_key_values=cache)
    assert torch.equal(ids, dense_ids)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    # 8 decode steps: plan at 1, dense 2, plan at 3, dense 4-6 (the interval doubled to 4), plan at 7, dense 8
    for state in cache.range_search.values():
        s = state.schedule
        assert (s.n_planned, s.n_dense, s.dense_left, s.interval) == (3, 5, 2, 4)


def test_a_plan_that_pays_keeps_the_layer_planning():
    model = attach_adapter(build_tiny_model("llama"), block_graft(recheck_every=2, recheck_max=4))
    cache = graft_of(model).make_cache()
    greedy(model, LONG_PROMPT, past_key_values=cache)
    for state in cache.range_search.values():
        assert (state.schedule.n_planned, state.schedule.n_dense) == (NEW_TOKENS - 1, 0)


def _decode_syncs(model, cache, steps=3):
    """Host syncs of each of `steps` one-token forwards after the prefill and one warm-up step."""
    counts = []
    with torch.no_grad():
        out = model(input_ids=LONG_PROMPT, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        model(input_ids=token, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            with HostSyncCounter() as syncs:
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            counts.append(syncs.total)
    return counts


@pytest.mark.parametrize("mode,most", [("block", 1), ("certified", 2)])
def test_host_syncs_per_layer_and_decode_step(mode, most):
    """Fails if a change adds a host sync to a decode step (counted on the CPU, where they cost nothing)."""
    base = build_tiny_model("llama")
    model = attach_adapter(base, block_graft(mode=mode, block_size=64, cluster_keys=64))  # no flush in the steps
    graft = graft_of(model)
    graft.config.track_recall = False
    with model.disable_adapter():
        dense = _decode_syncs(model, graft.make_cache())
    grafted = _decode_syncs(model, graft.make_cache())
    n_layers = len(graft.layer_indices)
    assert all(g - d <= most * n_layers for g, d in zip(grafted, dense)), (grafted, dense)
    assert any(g > d for g, d in zip(grafted, dense))  # the plan was read: the steps went through the index
    streak = attach_adapter(build_tiny_model("llama"), block_graft(dense_fallback=0.0, recheck_every=100,
                                                                    block_size=64, cluster_keys=64))
    graft_of(streak).config.track_recall = False
    assert _decode_syncs(streak, graft_of(streak).make_cache()) == dense  # the dense streak reads nothing


def test_exact_mode_dense_fallback_matches_the_index():
    """Rows the tree cannot prune take the dense scan: same kept set (reservoir tau, no key at tau), so the
    same output, whether every row, some rows (mixed) or none fall back."""
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(2, 2, 8, 16, generator=g)
    keys = centres[:, :, torch.randint(0, 8, (300,), generator=g)] + 0.2 * torch.randn(2, 2, 300, 16, generator=g)
    values = torch.randn(2, 2, 300, 16, generator=g)
    q = torch.randn(2, 4, 16, generator=g)
    q[0] = keys[0, [0, 0, 1, 1], 5]  # rows aligned with one cluster: the tree prunes the others
    key_mask = torch.ones(2, 300, dtype=torch.bool)
    key_mask[1, :20] = False
    index = RangeSearchIndex.build(keys[:, :, :256])
    index.append(keys[:, :, 256:])
    reservoir = KeyReservoir(128)
    reservoir.add(keys)
    tau = reservoir.threshold(q, 0.1)
    forced = forced_keys(key_mask, 2, 300, 2, 8, "cpu")
    fractions = index.candidate_fraction(q, tau)
    mixed = float(fractions.min() + fractions.max()) / 2
    run = {fallback: range_search_decode(q, keys, values, index, tau, forced=forced, key_mask=key_mask, scale=0.25,
                                         dense_fallback=fallback) for fallback in (1.0, mixed, 0.0)}
    assert 0 < (fractions <= mixed).sum() < 8
    torch.testing.assert_close(run[0.0], run[1.0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run[mixed], run[1.0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field_name,value", [
    ("mode", "fast"), ("mass_target", 0.0), ("mass_target", 1.5), ("tolerance", 1.0), ("block_keys", 0),
    ("block_keys", 5), ("cluster_keys", 300), ("outlier_norm", 0.0), ("dense_fallback", 1.5),
    ("recheck_every", 0), ("recheck_max", 4)])
def test_config_rejects_bad_mode_fields(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        RangeSearchConfig(**{field_name: value})
    assert field_name in RangeSearchConfig.field_help() and RangeSearchConfig.field_help()[field_name]


def test_config_saved_before_modes_loads_as_the_exact_mode():
    saved = {k: v for k, v in RangeSearchConfig(budget=0.1).to_dict().items() if k != "mode"}
    assert RangeSearchConfig.from_dict(saved).mode == "exact"
    assert RangeSearchConfig.from_dict({**saved, "mode": "block"}).mode == "block"
