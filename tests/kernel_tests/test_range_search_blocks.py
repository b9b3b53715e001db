"""The block index of the fast and certified range-search modes (issue 19): layout, estimates, bounds,
block-sparse decode against the plain reference, the certified guarantee, the dense fallback, host syncs,
and the Triton block-sparse kernel against its PyTorch reference.

The Triton tests need TRITON_INTERPRET=1 set before triton is imported, so on a CPU-only machine
`test_block_triton_under_interpreter` reruns the `block_triton_` tests of this file in a subprocess with it.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graftlm.host_syncs import HostSyncCounter
from graftlm.kernels.range_search import (
    BlockIndex,
    BlockPlan,
    DenseSchedule,
    KeyReservoir,
    attended_keys,
    block_sparse_decode,
    exact_scores,
    masked_softmax_attention,
    plan_read_fraction,
    triton_available,
)
from graftlm.kernels.range_search.block_attention import EXP_FLOOR, softmax
from graftlm.kernels.range_search.index import _pca_tree_order_segments, pca_tree_order

HEAD_SHAPES = {"smollm2": (3, 9, 64), "gemma3": (1, 4, 32)}  # (H_kv, H_q, D), Gemma's head dim shrunk


def clustered_cache(n, shape="smollm2", batch=1, seed=0):
    """Keys in a few clusters with a shared offset, queries near some keys: attention that can be pruned."""
    h_kv, h_q, d = HEAD_SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(batch, h_kv, 6, d, generator=g)
    pick = torch.randint(0, 6, (n,), generator=g)
    keys = centres[:, :, pick] + 0.5 * torch.randn(batch, h_kv, n, d, generator=g) + 0.5
    values = torch.randn(batch, h_kv, n, d, generator=g)
    kv_of = torch.arange(h_q) // (h_q // h_kv)
    q = keys[:, kv_of, torch.randint(0, n, (h_q,), generator=g)] + 0.3 * torch.randn(batch, h_q, d, generator=g)
    return q, keys, values


def small_index(keys, values, key_mask=None, **options):
    b, h, _, d = keys.shape
    values_ = {"block_keys": 8, "flush_keys": 32, "cluster_keys": 128, "window": 16, "n_sink": 2}
    values_.update(options)
    index = BlockIndex(b, h, d, values.shape[-1], **values_)
    index.sync(keys, values, key_mask)
    return index


def kept_reference(q, keys, values, plan, index, scale, key_mask=None):
    """Brute-force masked softmax over exactly the keys a plan attends."""
    attended = attended_keys(plan, index, key_mask)  # [G, N]
    b, h_q = q.shape[:2]
    group = h_q // keys.shape[1]
    keep = attended.view(b, keys.shape[1], 1, -1).expand(-1, -1, group, -1).reshape(b, h_q, -1)
    return masked_softmax_attention(exact_scores(q, keys), keep, values, scale), keep


# ------------------------------------------------------------------ layout
@pytest.mark.parametrize("n", [5, 47, 333, 701])
def test_blocks_hold_every_flushed_key_once_and_the_tail_the_rest(n):
    _, keys, values = clustered_cache(n, batch=2, seed=n)
    key_mask = torch.ones(2, n, dtype=torch.bool)
    key_mask[1, : n // 5] = False  # left padding on the second sequence
    index = small_index(keys, values, key_mask)
    assert index.n_blocked % 32 == 0 and n - index.n_blocked >= min(n, 16)
    assert n - index.n_blocked < 16 + 32
    g = 2 * keys.shape[1]
    flat_keys = keys.reshape(g, n, -1)
    for r in range(g):
        pos = index.positions[r][index.valid[r]]
        real = key_mask[r // keys.shape[1], : index.n_blocked]
        assert sorted(pos.tolist()) == real.nonzero().squeeze(-1).tolist()  # every real key once, no padding
        assert torch.equal(index.keys[r][index.valid[r]], flat_keys[r, pos])
    # the first n_sink real keys of each row sit in forced blocks (always attended exactly)
    if index.n_blocked:
        for r in range(g):
            first_real = int(key_mask[r // keys.shape[1]].long().argmax())
            for sink in range(first_real, first_real + 2):
                block = (index.positions[r] == sink).any(-1).nonzero().item()
                assert index.forced[r, block]


@pytest.mark.parametrize("g,n,d", [(3, 1024, 64), (2, 256, 17), (1, 64, 256)])
def test_pca_tree_order_on_equal_segments_matches_the_general_path(g, n, d):
    """The block index's fast path (n_leaves divides n: views instead of scatter-adds) splits exactly as
    the general path, on spread keys and on degenerate ones (duplicates, zeros)."""
    x = torch.randn(g, n, d, generator=torch.Generator().manual_seed(n + d))
    x[0, : n // 4] = x[0, 0]  # duplicates
    x[-1, n // 2:] = 0.0  # zeros
    order, n_leaves = pca_tree_order(x, 16)
    assert n % n_leaves == 0
    assert torch.equal(order, _pca_tree_order_segments(x, n_leaves, 4))
    assert torch.equal(order.sort(1).values, torch.arange(n).expand(g, n))


def test_sync_follows_a_growing_cache_like_a_rebuild():
    _, keys, values = clustered_cache(400, seed=3)
    grown = small_index(keys[:, :, :150], values[:, :, :150])
    for n in (151, 152, 200, 263, 400):
        grown.sync(keys[:, :, :n], values[:, :, :n])
    assert grown.n_keys == 400 and grown.n_flushes > 1
    for r in range(keys.shape[1]):
        assert sorted(grown.positions[r][grown.valid[r]].tolist()) == list(range(grown.n_blocked))
    with pytest.raises(ValueError, match="shrank"):
        grown.sync(keys[:, :, :10], values[:, :, :10])


def test_norm_outliers_go_to_forced_blocks():
    _, keys, values = clustered_cache(256, seed=4)
    keys[:, :, 100] *= 0.2  # a low-norm key, like SmolLM2's separator tokens
    index = small_index(keys, values, n_sink=0, outlier_norm=0.3)
    for r in range(keys.shape[1]):
        block = (index.positions[r] == 100).any(-1).nonzero().item()
        assert index.forced[r, block]
    none = small_index(keys, values, n_sink=0, outlier_norm=math.inf)
    assert not none.forced.any()


# ------------------------------------------------------------------ estimates and bounds
def test_estimates_are_the_gaussian_formula_and_bounds_dominate_every_block():
    q, keys, values = clustered_cache(333, seed=5)
    keys[:, :, 7] *= 1e3  # a huge key must not break the bound
    index = small_index(keys, values, bounds=True, outlier_norm=math.inf, n_sink=0)
    scale = 0.125
    qg = index.group_queries(q)
    est, ub = index.log_mass_estimates(qg, scale), index.log_mass_bounds(qg, scale)
    kb, valid = index.keys.float(), index.valid
    for r in range(qg.shape[0]):
        for b in range(index.n_blocks):
            members = kb[r, b][valid[r, b]]
            if not len(members):
                continue
            mean, var = members.mean(0), members.var(0, unbiased=False)
            expected = math.log(len(members)) + scale * qg[r] @ mean + 0.5 * scale**2 * (qg[r] ** 2) @ var
            torch.testing.assert_close(est[r, :, b], expected, rtol=1e-4, atol=1e-3)
            true = torch.logsumexp(scale * (qg[r] @ members.T), -1)
            assert (ub[r, :, b] >= true).all()


# ------------------------------------------------------------------ decode
@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
@pytest.mark.parametrize("mode", ["block", "certified"])
def test_block_decode_equals_the_reference_over_what_it_attends(shape, mode):
    q, keys, values = clustered_cache(517, shape, batch=2, seed=6)
    key_mask = torch.ones(2, 517, dtype=torch.bool)
    key_mask[0, :41] = False
    index = small_index(keys, values, key_mask, bounds=mode == "certified")
    scale = q.shape[-1] ** -0.5
    for target, fallback in ((0.9, 1.0), (0.99, 1.0), (0.9, 0.0), (0.9, 0.5)):
        out, plan = block_sparse_decode(q, keys, values, index, scale=scale, mode=mode, mass_target=target,
                                        tolerance=1 - target, dense_fallback=fallback, key_mask=key_mask)
        ref, keep = kept_reference(q, keys, values, plan, index, scale, key_mask)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        assert not (keep & ~key_mask[:, None, :]).any(), "a padded key was attended"
    # the index prunes these keys: at 0.9 most kv rows read part of their blocks
    _, plan = block_sparse_decode(q, keys, values, index, scale=scale, mass_target=0.9, dense_fallback=1.0,
                                  key_mask=key_mask)
    if mode == "block":
        assert attended_keys(plan, index, key_mask).float().mean() < 0.9


@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
def test_full_target_or_no_fallback_budget_is_dense_attention(shape):
    q, keys, values = clustered_cache(300, shape, seed=7)
    index = small_index(keys, values)
    dense = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)[:, :, 0]
    for options in ({"mass_target": 1.0, "dense_fallback": 1.0}, {"dense_fallback": 0.0}):
        out, plan = block_sparse_decode(q, keys, values, index, **options)
        assert all(plan.dense)
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


def test_certified_bound_holds_on_the_true_left_out_mass():
    q, keys, values = clustered_cache(611, seed=8)
    index = small_index(keys, values, bounds=True)
    scale = 0.125
    for tol in (0.3, 0.05, 0.01):
        out, plan = block_sparse_decode(q, keys, values, index, scale=scale, mode="certified", tolerance=tol,
                                        dense_fallback=1.0)
        _, keep = kept_reference(q, keys, values, plan, index, scale)
        p = torch.softmax(scale * exact_scores(q, keys), -1)
        left_out = (p * ~keep).sum(-1).view(-1, q.shape[1] // keys.shape[1])  # [G, group]
        assert (left_out <= plan.bound + 1e-6).all()
        assert (plan.bound <= tol).all()
        dense = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys, values, scale=scale,
                                                                 enable_gqa=True)[:, :, 0]
        assert ((out - dense).norm(dim=-1) <= 2 * plan.bound.max() * values.norm(dim=-1).max() + 1e-5).all()


def test_block_mode_reads_its_plan_in_one_host_sync_and_certified_in_two():
    q, keys, values = clustered_cache(517, seed=9)
    index = small_index(keys, values, bounds=True)
    for mode, most in (("block", 1), ("certified", 2)):
        with HostSyncCounter() as syncs:
            block_sparse_decode(q, keys, values, index, mode=mode, mass_target=0.9, tolerance=0.1,
                                dense_fallback=1.0)
        assert 1 <= syncs.total <= most, (mode, syncs.counts)


def test_no_capacity_skips_the_plan_and_is_dense_without_a_host_sync():
    q, keys, values = clustered_cache(300, seed=10)
    index = small_index(keys, values, bounds=True)
    dense = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)[:, :, 0]
    for mode in ("block", "certified"):
        with HostSyncCounter() as syncs:
            out, plan = block_sparse_decode(q, keys, values, index, mode=mode, dense_fallback=0.0)
        assert syncs.total == 0 and all(plan.dense) and plan.order.shape[1] == 0
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
        assert (mode == "certified") == (plan.bound is not None and bool((plan.bound == 0).all()))
        assert attended_keys(plan, index, None).all()


def test_plan_read_fraction_counts_dense_rows_whole_and_blocks_by_size():
    q, keys, values = clustered_cache(517, seed=11)
    index = small_index(keys, values)
    _, plan = block_sparse_decode(q, keys, values, index, mass_target=0.9, dense_fallback=1.0)
    read = attended_keys(plan, index, None).float().mean().item()  # what the rows really read
    # the estimate counts the forced blocks at the widest row's width, so it can only be above
    assert read - 1e-6 <= plan_read_fraction(plan, index) <= read + index.exact_keys.shape[1] / index.n_keys
    assert plan_read_fraction(BlockPlan(plan.order, plan.counts, [True] * len(plan.dense)), index) == 1.0


def test_dense_schedule_backs_off_while_plans_do_not_pay_and_resets_when_one_does():
    q, keys, values = clustered_cache(517, seed=12)
    index = small_index(keys, values)
    _, cheap = block_sparse_decode(q, keys, values, index, mass_target=0.5, dense_fallback=1.0)
    dense = BlockPlan(cheap.order, cheap.counts, [True] * len(cheap.dense))
    schedule = DenseSchedule(recheck_every=2, recheck_max=8)
    planned = []
    for step in range(24):
        planned.append(schedule.plan_now())
        if planned[-1]:
            schedule.record(cheap if step >= 15 else dense, index, dense_fallback=1.0)
    # plans at 0, 2 (interval 2), 6 (4), 14 (8), 22 (8, the cap); the plan at 22 pays -> next step plans
    assert [i for i, p in enumerate(planned) if p] == [0, 2, 6, 14, 22, 23]
    assert schedule.interval == 2 and schedule.n_planned + schedule.n_dense == 24
    with pytest.raises(ValueError, match="recheck_max"):
        DenseSchedule(recheck_every=4, recheck_max=2)


def test_softmax_floor_changes_no_weight_that_matters():
    logits = torch.tensor([[0.0, -10.0, -200.0, -math.inf], [-math.inf] * 4])
    p = softmax(logits)
    torch.testing.assert_close(p[0], torch.softmax(logits[0], -1), atol=1e-30, rtol=1e-6)
    assert p[0, 2] <= math.exp(EXP_FLOOR) and torch.equal(p[1], torch.zeros(4))


def test_reservoir_adds_without_host_syncs_and_stays_uniform():
    reservoir = KeyReservoir(capacity=8, seed=0)
    stream = torch.arange(40.0).view(1, 1, 40, 1)
    with HostSyncCounter() as syncs:
        for start in range(0, 40, 3):
            reservoir.add(stream[:, :, start:start + 3])
    assert syncs.total == 0, syncs.counts
    assert reservoir.sample.shape == (1, 1, 8, 1) and len(set(reservoir.sample.flatten().tolist())) == 8


# ------------------------------------------------------------------ Triton block-sparse kernel
_triton_here = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not (_triton_here and triton_available()),
                                  reason="needs triton with TRITON_INTERPRET=1 or a GPU")
_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.skipif(not triton_available(), reason="triton is not importable")
@pytest.mark.skipif(_triton_here, reason="already running with triton enabled")
def test_block_triton_under_interpreter():
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "--noconftest", "-q", "-p", "no:cacheprovider", "-k", "block_triton_",
           __file__]
    done = subprocess.run(cmd, check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 passed" in done.stdout, done.stdout[-500:]


@needs_triton
@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
def test_block_triton_partials_match_reference(shape):
    from graftlm.kernels.range_search.reference import block_partials_ref
    from graftlm.kernels.range_search.triton_blocks import block_partials

    q, keys, values = (t.to(_DEVICE) for t in clustered_cache(333, shape, batch=2, seed=10))
    key_mask = torch.ones(2, 333, dtype=torch.bool, device=_DEVICE)
    key_mask[1, :29] = False
    index = small_index(keys, values, key_mask)
    qg = index.group_queries(q)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(index.n_blocks, generator=g) for _ in range(qg.shape[0])]).to(_DEVICE)
    counts = torch.randint(0, index.n_blocks + 1, (qg.shape[0],), generator=g).to(_DEVICE)
    counts[0] = 0  # a row that reads nothing
    got = block_partials(qg, index, ids, counts, 0.2, per_split=3)
    m, l_, o = block_partials_ref(qg.cpu(), index.keys.cpu(), index.values.cpu(), index.valid.cpu(), ids.cpu(),
                                  counts.cpu(), 0.2)
    torch.testing.assert_close(got.m.cpu(), m, atol=1e-5, rtol=1e-5)
    reference_out = o / l_.clamp(min=1e-30)[..., None]
    read = counts.cpu() > 0
    torch.testing.assert_close(got.output().cpu()[read], reference_out[read], atol=1e-5, rtol=1e-4)
    assert torch.equal(got.l.cpu()[~read], torch.zeros_like(l_[~read]))


@needs_triton
@pytest.mark.parametrize("shape", sorted(HEAD_SHAPES))
def test_block_triton_decode_matches_torch_path(shape):
    from graftlm.kernels.range_search.triton_blocks import block_sparse_decode_triton

    q, keys, values = (t.to(_DEVICE) for t in clustered_cache(517, shape, batch=2, seed=11))
    key_mask = torch.ones(2, 517, dtype=torch.bool, device=_DEVICE)
    key_mask[0, :33] = False
    index = small_index(keys, values, key_mask)
    for target, fallback in ((0.9, 1.0), (0.99, 0.5), (0.9, 0.0)):
        options = {"scale": 0.2, "mass_target": target, "dense_fallback": fallback, "key_mask": key_mask}
        ref, plan = block_sparse_decode(q, keys, values, index, **options)
        out, tensor_plan = block_sparse_decode_triton(q, keys, values, index, **options)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        assert tensor_plan.dense.tolist() == plan.dense
