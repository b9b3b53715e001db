"""Range-search attention kernels: the exact index, thresholds, recall metrics, CPU and Triton paths.

The Triton tests need TRITON_INTERPRET=1 set before triton is imported, so on a CPU-only machine
`test_triton_under_interpreter` reruns the `triton_` tests of this file in a subprocess with it set.
Retrieval on real keys captured from an embedded checkpoint is tested by the integration layer.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graftlm.kernels.range_search import (
    KeyReservoir,
    RangeSearchIndex,
    budget_threshold,
    exact_scores,
    halfspace_mask,
    kept_mask,
    range_search_attention_cpu,
    range_search_attention_ref,
    sample_threshold,
    softmax_mass_recall,
    threshold_recall,
    triton_available,
)

# (H_kv, H_q, D): SmolLM2-135M and Gemma 3 270M decode heads
HEAD_SHAPES = {"smollm2": (3, 9, 64), "gemma3": (1, 4, 256)}


def make_cache(n_keys, shape="smollm2", batch=2, seed=0, structured=False):
    h_kv, h_q, d = HEAD_SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    if structured:
        centres = 3 * torch.randn(batch, h_kv, 8, d, generator=g)
        pick = torch.randint(0, 8, (n_keys,), generator=g)
        keys = centres[:, :, pick] + 0.3 * torch.randn(batch, h_kv, n_keys, d, generator=g)
    else:
        keys = torch.randn(batch, h_kv, n_keys, d, generator=g)
    values = torch.randn(batch, h_kv, n_keys, d, generator=g)
    q = torch.randn(batch, h_q, d, generator=g)
    return q, keys, values


def gap_threshold(scores, budget):
    """tau halfway between two consecutive scores: no key sits within rounding distance of it."""
    top = scores.sort(dim=-1, descending=True).values
    m = max(1, math.ceil(budget * scores.shape[-1]))
    if m >= scores.shape[-1]:
        return top[..., -1] - 1.0
    return 0.5 * (top[..., m - 1] + top[..., m])


# ------------------------------------------------------------------ exact retrieval
@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
@pytest.mark.parametrize("n_keys", [1, 7, 333, 1021])
def test_retrieval_equals_brute_force(shape, n_keys):
    q, keys, _ = make_cache(n_keys, shape, seed=n_keys)
    index = RangeSearchIndex.build(keys)
    scores = exact_scores(q, keys)
    for budget in (0.01, 0.1, 0.5):
        tau = budget_threshold(scores, budget)  # tau equals a key's score: the hardest tie
        assert torch.equal(index.search(q, tau, keys), halfspace_mask(q, keys, tau))
    tau = torch.randn(q.shape[:2]) * scores.std()
    assert torch.equal(index.search(q, tau, keys), halfspace_mask(q, keys, tau))


def test_index_prunes_structured_keys():
    q, keys, _ = make_cache(1021, structured=True, seed=3)
    q = keys[:, [0, 0, 0, 1, 1, 1, 2, 2, 2], -1] + 0.1 * q  # queries aligned with a cluster
    index = RangeSearchIndex.build(keys)
    scores = exact_scores(q, keys)
    tau = budget_threshold(scores, 0.02)
    rows, _ = index.candidates(q, tau)
    assert torch.equal(index.search(q, tau, keys), halfspace_mask(q, keys, tau))
    assert rows.numel() < 0.5 * scores.numel(), "bounds should discard most keys of other clusters"


def test_every_node_bound_covers_its_keys():
    q, keys, _ = make_cache(333, "gemma3", batch=1, structured=True, seed=5)
    index = RangeSearchIndex.build(keys, leaf_size=4, fanout=4)
    scores = exact_scores(q, keys)[0]  # [H_q, N]
    h_q = q.shape[1]
    leaf_keys = index.slots.view(index.slots.shape[0], -1, index.leaf_size)  # [G, M0, leaf]
    per_level_keys = leaf_keys
    for level in range(len(index.centres)):
        m = index.centres[level].shape[1]
        rows = torch.arange(h_q).repeat_interleave(m)
        nodes = torch.arange(m).repeat(h_q)
        from graftlm.kernels.range_search.index import subspace_norms

        qf = q[0].float()
        qn = subspace_norms(qf, index.bounds) * (1 + index.eps)
        ub = index._bounds(level, qf, qn, rows, index.kv_row_of(h_q)[rows], nodes).view(h_q, m)
        members = per_level_keys[0]  # [M_l, keys per node]
        member_scores = torch.where(members >= 0, scores[:, members.clamp(min=0)], -math.inf)
        assert (ub >= member_scores.amax(-1)).all()
        pad = (-members.shape[0]) % index.fanout
        if pad:
            members = torch.cat([members, members.new_full((pad, members.shape[1]), -1)])
        per_level_keys = members.view(-1, index.fanout * members.shape[1]).unsqueeze(0)


# ------------------------------------------------------------------ attention outputs
@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
def test_minus_infinity_threshold_is_dense_attention(shape):
    q, keys, values = make_cache(333, shape)
    tau = torch.full(q.shape[:2], -math.inf)
    index = RangeSearchIndex.build(keys)
    h_q = q.shape[1]
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, enable_gqa=True
    ).squeeze(2)
    k_rep = keys.repeat_interleave(h_q // keys.shape[1], 1)
    v_rep = values.repeat_interleave(h_q // keys.shape[1], 1)
    plain = torch.einsum("bhn,bhnd->bhd", torch.softmax(torch.einsum("bhd,bhnd->bhn", q, k_rep) / q.shape[-1] ** 0.5, -1), v_rep)
    for out in (range_search_attention_ref(q, keys, values, tau), range_search_attention_cpu(q, keys, values, index, tau)):
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out, plain, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
def test_cpu_path_matches_reference(shape):
    q, keys, values = make_cache(1021, shape, seed=11, structured=True)
    key_mask = torch.ones(2, 1021, dtype=torch.bool)
    key_mask[1, :40] = False  # left padding on the second sequence
    index = RangeSearchIndex.build(keys)
    tau = budget_threshold(exact_scores(q, keys), 0.05)
    for kwargs in ({}, {"n_sink": 4, "n_window": 64}, {"n_sink": 4, "n_window": 64, "key_mask": key_mask}):
        ref = range_search_attention_ref(q, keys, values, tau, **kwargs)
        out = range_search_attention_cpu(q, keys, values, index, tau, **kwargs)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    nothing = range_search_attention_cpu(q, keys, values, index, torch.full(q.shape[:2], math.inf))
    assert torch.equal(nothing, torch.zeros_like(nothing))


def test_sparse_output_differs_from_dense_when_keys_are_dropped():
    q, keys, values = make_cache(333, seed=2)
    index = RangeSearchIndex.build(keys)
    tau = budget_threshold(exact_scores(q, keys), 0.05)
    dense = range_search_attention_ref(q, keys, values, torch.full(q.shape[:2], -math.inf))
    sparse = range_search_attention_cpu(q, keys, values, index, tau)
    assert (sparse - dense).abs().max() > 1e-3


# ------------------------------------------------------------------ decode appends
@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
def test_append_equals_rebuild(shape):
    q, keys, _ = make_cache(700, shape, seed=7)
    grown = RangeSearchIndex.build(keys[:, :, :300], block_size=64)
    at = 300
    for step in (1, 1, 5, 63, 130, 150, 1, 49):  # single decode keys and odd batches
        grown.append(keys[:, :, at : at + step])
        at += step
    assert at == 700 and grown.n_keys == 700
    assert 0 < grown.pending.shape[2] < 64 and grown.n_indexed > 300
    rebuilt = RangeSearchIndex.build(keys)
    scores = exact_scores(q, keys)
    for budget in (0.02, 0.3):
        tau = budget_threshold(scores, budget)
        brute = halfspace_mask(q, keys, tau)
        assert torch.equal(grown.search(q, tau, keys), brute)
        assert torch.equal(rebuilt.search(q, tau, keys), brute)
    grown.flush()
    assert grown.pending.shape[2] == 0 and grown.n_indexed == 700
    assert torch.equal(grown.search(q, tau, keys), brute)
    assert grown.centres[-1].shape[1] == 1, "the upper levels must end in a single root"


# ------------------------------------------------------------------ adversarial inputs
def adversarial_caches():
    d = 64
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 3, 1, d, generator=g)
    yield "duplicates", base.expand(1, 3, 50, d).clone()
    yield "zeros", torch.zeros(1, 3, 37, d)
    yield "one key", torch.randn(1, 3, 1, d, generator=g)
    huge = torch.randn(1, 3, 41, d, generator=g)
    huge[:, :, ::5] *= 1e18  # squared norms near the float32 limit
    huge[:, :, 3] *= 1e37  # dot products overflow to inf
    yield "huge norms", huge
    mixed = torch.randn(1, 3, 41, d, generator=g) * torch.logspace(-20, 10, 41)[None, None, :, None]
    yield "tiny and large", mixed
    half_dup = torch.randn(1, 3, 29, d, generator=g)
    half_dup[:, :, 10:] = half_dup[:, :, 3:4]
    yield "partial duplicates", half_dup


@pytest.mark.parametrize("name,keys", list(adversarial_caches()), ids=lambda v: v if isinstance(v, str) else "")
def test_adversarial_inputs_have_no_false_negatives(name, keys):
    g = torch.Generator().manual_seed(2)
    index = RangeSearchIndex.build(keys, n_subspaces=4)
    queries = [torch.randn(1, 9, 64, generator=g), torch.zeros(1, 9, 64), keys[:, [0, 0, 0, 1, 1, 1, 2, 2, 2], 0]]
    for q in queries:
        scores = exact_scores(q, keys)
        taus = [budget_threshold(scores, 0.1), torch.zeros(1, 9), torch.full((1, 9), -math.inf)]
        for tau in taus:
            assert torch.equal(index.search(q, tau, keys), halfspace_mask(q, keys, tau)), name


def test_uneven_subspaces_and_leaf_sizes():
    q, keys, _ = make_cache(101, seed=4)
    scores = exact_scores(q, keys)
    tau = budget_threshold(scores, 0.1)
    for options in ({"n_subspaces": 3}, {"n_subspaces": 64}, {"leaf_size": 1}, {"leaf_size": 7, "fanout": 2}):
        index = RangeSearchIndex.build(keys, **options)
        assert torch.equal(index.search(q, tau, keys), halfspace_mask(q, keys, tau)), options


# ------------------------------------------------------------------ thresholds and recall
def test_budget_threshold_keeps_the_right_fraction():
    scores = torch.randn(2, 3, 1000)
    for budget in (0.001, 0.05, 0.333):
        tau = budget_threshold(scores, budget)
        assert ((scores >= tau[..., None]).sum(-1) == math.ceil(budget * 1000)).all()
    key_mask = torch.ones(2, 1000, dtype=torch.bool)
    key_mask[0, :500] = False
    tau = budget_threshold(scores, 0.1, key_mask)
    kept = ((scores >= tau[..., None]) & key_mask[:, None]).sum(-1)
    assert kept[0].eq(50).all() and kept[1].eq(100).all()
    assert torch.isinf(budget_threshold(scores, 1.0)).all()


def test_sampled_threshold_from_reservoir_keeps_about_the_budget():
    q, keys, _ = make_cache(8000, batch=1, seed=9)
    reservoir = KeyReservoir(capacity=2000, seed=0)
    for start in range(0, 8000, 1000):
        reservoir.add(keys[:, :, start : start + 1000])
    assert reservoir.sample.shape == (1, 3, 2000, 64) and reservoir.seen == 8000
    member = (reservoir.sample[0, 0, :, None, :] == keys[0, 0, None, :, :]).all(-1).any(-1)
    assert member.all(), "the reservoir must hold keys from the stream"
    kept = (exact_scores(q, keys) >= reservoir.threshold(q, 0.1)[..., None]).float().mean(-1)
    assert ((kept - 0.1).abs() < 0.03).all()
    tau = sample_threshold(q, keys, 0.1)
    assert ((exact_scores(q, keys) >= tau[..., None]).float().mean(-1) - 0.1).abs().max() < 2e-3


def test_reservoir_is_uniform():
    counts = torch.zeros(60)
    trials = 300
    for seed in range(trials):
        reservoir = KeyReservoir(capacity=12, seed=seed)
        stream = torch.arange(60.0).view(1, 1, 60, 1)
        for start, size in ((0, 7), (7, 1), (8, 30), (38, 22)):
            reservoir.add(stream[:, :, start : start + size])
        counts[reservoir.sample.flatten().long()] += 1
    freq = counts / trials  # each key should be kept with probability 12 / 60
    assert (freq - 0.2).abs().max() < 0.1 and abs(freq.mean() - 0.2) < 1e-6


def test_recall_metrics_on_a_hand_made_case():
    scores = torch.tensor([[[math.log(4.0), math.log(2.0), math.log(1.0), math.log(1.0)]]])  # softmax 1/2, 1/4, 1/8, 1/8
    retrieved = torch.tensor([[[True, False, True, False]]])
    assert softmax_mass_recall(scores, retrieved, scale=1.0).item() == pytest.approx(0.625)
    tau = torch.tensor([[math.log(1.5)]])  # keys 0 and 1 are above tau; key 1 was missed
    assert threshold_recall(scores, tau, retrieved).item() == pytest.approx(0.5)
    assert threshold_recall(scores, torch.tensor([[10.0]]), retrieved).item() == 1.0
    keep = kept_mask(scores, tau, n_sink=0, n_window=1)
    assert keep.tolist() == [[[True, True, False, True]]]


# ------------------------------------------------------------------ Triton kernels
_triton_here = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    not (_triton_here and triton_available()), reason="needs triton with TRITON_INTERPRET=1 or a GPU"
)
_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.skipif(not triton_available(), reason="triton is not importable")
@pytest.mark.skipif(_triton_here, reason="already running with triton enabled")
def test_triton_under_interpreter():
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "--noconftest", "-q", "-p", "no:cacheprovider", "-k", "triton_", __file__]
    done = subprocess.run(cmd, check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 passed" in done.stdout, done.stdout[-500:]


@needs_triton
@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
def test_triton_pair_bounds_match_torch(shape):
    q, keys, _ = make_cache(333, shape, seed=21)
    q, keys = q.to(_DEVICE), keys.to(_DEVICE)
    keys[:, :, 5] *= 1e37  # non-finite bounds must come out as +inf in both
    index = RangeSearchIndex.build(keys)
    from graftlm.kernels.range_search.index import subspace_norms

    qf = q.reshape(-1, q.shape[-1]).float()
    qn = subspace_norms(qf, index.bounds) * (1 + index.eps)
    m = index.centres[0].shape[1]
    rows = torch.arange(qf.shape[0], device=_DEVICE).repeat_interleave(m)
    nodes = torch.arange(m, device=_DEVICE).repeat(qf.shape[0])
    kv = index.kv_row_of(q.shape[1]).to(_DEVICE)[rows]
    torch_ub = index._bounds(0, qf, qn, rows, kv, nodes, "torch")
    triton_ub = index._bounds(0, qf, qn, rows, kv, nodes, "triton")
    assert torch.isinf(triton_ub).any()
    assert torch.equal(torch.isinf(torch_ub), torch.isinf(triton_ub))
    finite = torch.isfinite(torch_ub)
    torch.testing.assert_close(triton_ub[finite], torch_ub[finite], atol=1e-3, rtol=1e-5)
    tau = gap_threshold(exact_scores(q, keys), 0.1)
    assert [torch.equal(a, b) for a, b in zip(index.candidates(q, tau), index.candidates(q, tau, backend="triton"))] == [True, True]


@needs_triton
@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
def test_triton_gathered_attention_matches_reference(shape):
    from graftlm.kernels.range_search import gathered_attention, range_search_attention_triton

    q, keys, values = (t.to(_DEVICE) for t in make_cache(333, shape, seed=22, structured=True))
    index = RangeSearchIndex.build(keys)
    scores = exact_scores(q, keys)
    key_mask = torch.ones(2, 333, dtype=torch.bool, device=_DEVICE)
    key_mask[0, :17] = False
    for budget, kwargs in ((0.05, {}), (0.2, {"n_sink": 4, "n_window": 32}), (0.1, {"n_sink": 2, "key_mask": key_mask})):
        tau = gap_threshold(scores, budget)  # the fused filter may round differently exactly at tau
        ref = range_search_attention_ref(q, keys, values, tau, **kwargs)
        out = range_search_attention_triton(q, keys, values, index, tau, **kwargs)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    all_ids = torch.arange(333, device=_DEVICE).expand(q.shape[0] * q.shape[1], 333)
    dense = gathered_attention(q, keys, values, all_ids)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), keys, values, enable_gqa=True)
    torch.testing.assert_close(dense, sdpa.squeeze(2), atol=1e-5, rtol=1e-4)
    empty = gathered_attention(q, keys, values, torch.full((q.shape[0] * q.shape[1], 5), -1, device=_DEVICE))
    assert torch.equal(empty, torch.zeros_like(empty))
