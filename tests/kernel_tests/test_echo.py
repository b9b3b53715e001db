"""Echo recall state operator (graftlm/kernels/echo): one meaning across reference, chunked and recurrent
paths, recall, the spectral bound, numerics on long or degenerate inputs, constant state size."""

import dataclasses

import pytest
import torch

from graftlm.kernels.echo import (
    echo_chunked,
    echo_recurrent,
    echo_reference,
    echo_state_numel,
    echo_step,
    init_state,
    readout_operator,
    whitened_operator,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_inputs(batch=2, heads=2, length=65, rank=4, value_dim=3, dtype=F64, seed=0, grad=False):
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(grad)
    return (make(batch, heads, length, rank), make(batch, heads, length, rank),
            make(batch, heads, length, value_dim))


def per_head_params(heads=2, grad=False):
    gamma = torch.linspace(1.1, 1.4, heads, dtype=F64).requires_grad_(grad)  # inside the clamp
    eta = torch.linspace(0.5, 2.0, heads, dtype=F64).requires_grad_(grad)
    return gamma, eta


@pytest.mark.parametrize("power", [0, 2])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("length", [1, 63, 65, 130])
def test_chunked_equals_brute_force_reference(length, chunk_size, power):
    z, q, v = random_inputs(length=length, seed=length + chunk_size)
    gamma, eta = per_head_params()
    expected = echo_reference(z, q, v, gamma, eta, power=power, chunk_size=chunk_size)
    actual = echo_chunked(z, q, v, gamma, eta, power=power, chunk_size=chunk_size)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("power", [0, 2])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("length", [1, 63, 65, 130])
def test_recurrent_equals_chunked_outputs_and_gradients(length, chunk_size, power):
    z, q, v = random_inputs(length=length, seed=100 + length, grad=True)
    gamma, eta = per_head_params(grad=True)
    weights = torch.randn(v.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    inputs = (z, q, v, gamma, eta)

    chunked = echo_chunked(z, q, v, gamma, eta, power=power, chunk_size=chunk_size)
    chunked_grads = torch.autograd.grad((chunked * weights).sum(), inputs, materialize_grads=True)
    recurrent, _ = echo_recurrent(z, q, v, gamma, eta, power=power, chunk_size=chunk_size)
    recurrent_grads = torch.autograd.grad((recurrent * weights).sum(), inputs, materialize_grads=True)

    torch.testing.assert_close(recurrent, chunked, rtol=1e-9, atol=1e-10)
    for name, got, want in zip(["z", "q", "v", "gamma", "eta"], recurrent_grads, chunked_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9, msg=f"gradient w.r.t. {name}")
    if length > chunk_size + 1:  # something beyond the first (empty) chunk was read, so these are not vacuous
        assert chunked.abs().max() > 1e-3 and chunked_grads[0].abs().max() > 1e-3
        assert (chunked_grads[3].abs().min() > 1e-6) == (power > 0)  # gamma acts only through the filter


@pytest.mark.parametrize("chunk_size, prefill", [(1, 1), (1, 40), (16, 16), (16, 37), (64, 1)])
def test_chunked_prefill_then_decode_equals_one_chunked_forward(chunk_size, prefill):
    z, q, v = random_inputs(length=80, seed=3)
    gamma, eta = per_head_params()
    full = echo_chunked(z, q, v, gamma, eta, chunk_size=chunk_size)
    head, state = echo_chunked(z[..., :prefill, :], q[..., :prefill, :], v[..., :prefill, :], gamma, eta,
                               chunk_size=chunk_size, return_state=True)
    rest = slice(prefill, None)
    tail, _ = echo_recurrent(z[..., rest, :], q[..., rest, :], v[..., rest, :], gamma, eta, state=state)
    torch.testing.assert_close(torch.cat([head, tail], dim=-2), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk_size, changed, first_affected", [(1, 20, 21), (8, 20, 24), (64, 3, 64)])
def test_position_reads_only_earlier_chunks(chunk_size, changed, first_affected):
    z, q, v = random_inputs(length=70, seed=5)
    y = echo_chunked(z, q, v, 1.2, chunk_size=chunk_size)
    z2, v2 = z.clone(), v.clone()
    z2[..., changed, :] += 1.0
    v2[..., changed, :] -= 1.0
    y2 = echo_chunked(z2, q, v2, 1.2, chunk_size=chunk_size)
    torch.testing.assert_close(y2[..., :first_affected, :], y[..., :first_affected, :], rtol=0, atol=0)
    assert (y2[..., first_affected, :] - y[..., first_affected, :]).abs().max() > 1e-6
    assert y[..., :chunk_size, :].abs().max() == 0  # the first chunk reads empty statistics


def test_stable_readout_equals_direct_formula_when_no_normalisation_is_active():
    generator = torch.Generator().manual_seed(11)
    rank, value_dim, eps = 5, 3, 1e-3
    keys = torch.randn(40, rank, generator=generator, dtype=F64)
    gram = keys.T @ keys
    lag = 0.05 * torch.randn(rank, rank, generator=generator, dtype=F64)
    cross = torch.randn(value_dim, rank, generator=generator, dtype=F64)
    _, operator = whitened_operator(gram, lag, torch.tensor(1.0, dtype=F64), eps)
    assert torch.linalg.matrix_norm(operator, ord=2) < 1  # so A^ = A and the identity is exact
    ridged = gram + eps * torch.eye(rank, dtype=F64)
    for power in range(4):
        inverse = torch.linalg.inv(ridged)
        direct = cross @ inverse @ torch.linalg.matrix_power(lag @ inverse, power)
        stable = readout_operator(gram, lag, cross, torch.tensor(1.0, dtype=F64), power, eps)
        torch.testing.assert_close(stable, direct, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.25, 1.5, 3.0])
def test_spectral_normalisation_keeps_operator_norm_at_most_gamma(gamma):
    generator = torch.Generator().manual_seed(13)
    keys = torch.randn(6, 30, 4, generator=generator, dtype=F64)
    gram = keys.mT @ keys
    lag = 50 * torch.randn(6, 4, 4, generator=generator, dtype=F64)  # sigma_max(A) >> 1
    lag[0] *= 1e-4  # and one with sigma_max(A) < 1, left unnormalised
    _, operator = whitened_operator(gram, lag, torch.tensor(gamma, dtype=F64))
    norms = torch.linalg.matrix_norm(operator, ord=2)
    clamped = min(max(gamma, 1.0), 1.5)
    assert (norms <= clamped * (1 + 1e-12)).all()
    torch.testing.assert_close(norms[1:], torch.full_like(norms[1:], clamped))
    assert norms[0] < 1


@pytest.mark.parametrize("chunk_size", [1, 8])
def test_orthogonal_keys_ridge_recall_returns_stored_values(chunk_size):
    rank, pairs, value_dim = 8, 8, 5
    generator = torch.Generator().manual_seed(17)
    basis, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=F64))
    stored_keys = basis.T[:pairs]  # orthonormal rows
    stored_values = torch.randn(pairs, value_dim, generator=generator, dtype=F64)
    order = torch.randperm(pairs, generator=generator)
    # Tokens 0..7 write (key, value); tokens 8..15 carry zero keys (write nothing) and query the keys.
    z = torch.cat([stored_keys, torch.zeros(pairs, rank, dtype=F64)])[None, None]
    v = torch.cat([stored_values, torch.zeros(pairs, value_dim, dtype=F64)])[None, None]
    q = torch.cat([torch.zeros(pairs, rank, dtype=F64), stored_keys[order]])[None, None]
    for eps in (1e-9, 1e-3):
        chunked = echo_chunked(z, q, v, 1.0, power=0, chunk_size=chunk_size, eps=eps)[0, 0, pairs:]
        recurrent = echo_recurrent(z, q, v, 1.0, power=0, chunk_size=chunk_size, eps=eps)[0][0, 0, pairs:]
        expected = stored_values[order] / (1 + eps)  # ridge shrinkage of a unit-norm key
        torch.testing.assert_close(chunked, expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(recurrent, expected, rtol=1e-9, atol=1e-9)


def test_output_is_invariant_to_rescaling_the_keys():
    z, q, v = random_inputs(length=50, seed=19)
    y = echo_chunked(z, q, v, 1.3, chunk_size=4)
    torch.testing.assert_close(echo_chunked(37.0 * z, q, v, 1.3, chunk_size=4), y, rtol=1e-9, atol=1e-10)


def test_power_filter_changes_output_and_stays_finite():
    z, q, v = random_inputs(length=130, seed=23)
    ridge = echo_chunked(z, q, v, 1.5, power=0, chunk_size=16)
    filtered = echo_chunked(z, q, v, 1.5, power=2, chunk_size=16)
    assert torch.isfinite(ridge).all() and torch.isfinite(filtered).all()
    assert (ridge - filtered).abs().max() > 1e-3


def finite_forward_and_backward(fn, z, q, v, gamma):
    y = fn(z, q, v, gamma)
    z_grad, q_grad, v_grad, gamma_grad = torch.autograd.grad(y.square().mean(), (z, q, v, gamma))
    for tensor in (y, z_grad, q_grad, v_grad, gamma_grad):
        assert torch.isfinite(tensor).all()
    return y


@pytest.mark.parametrize("keys", ["random", "repeated", "repeated_then_zero"])
def test_long_float32_sequence_has_finite_outputs_and_gradients(keys):
    length, rank = 4096, 4
    generator = torch.Generator().manual_seed(29)
    z = torch.randn(1, 2, length, rank, generator=generator)
    if keys != "random":  # one key over and over: G has rank one, its condition number ~ T / eps
        z = z[..., :1, :].expand_as(z).clone()
    if keys == "repeated_then_zero":
        z[..., length // 2:, :] = 0
    z.requires_grad_(True)
    q = torch.randn(1, 2, length, rank, generator=generator, requires_grad=True)
    v = torch.randn(1, 2, length, 8, generator=generator, requires_grad=True)
    gamma = torch.tensor(1.2, requires_grad=True)
    y = finite_forward_and_backward(lambda *a: echo_chunked(*a, power=2, chunk_size=64), z, q, v, gamma)
    assert y.dtype == torch.float32 and y[..., 64:, :].abs().max() > 1e-3


def test_recurrent_repeated_keys_have_finite_outputs_and_gradients():
    z = torch.ones(1, 1, 120, 3, requires_grad=True)
    q = torch.randn(1, 1, 120, 3, requires_grad=True)
    v = torch.randn(1, 1, 120, 2, requires_grad=True)
    finite_forward_and_backward(lambda *a: echo_recurrent(*a, power=2, chunk_size=1)[0], z, q, v,
                                torch.tensor(1.4, requires_grad=True))


def test_float32_inputs_match_float64_inputs():
    z, q, v = random_inputs(length=130, seed=31)
    y64 = echo_chunked(z, q, v, 1.2, chunk_size=16)
    y32 = echo_chunked(z.float(), q.float(), v.float(), 1.2, chunk_size=16)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 64])
def test_state_size_is_constant_in_sequence_length(chunk_size, stats_dtype):
    heads, rank, value_dim = 3, 4, 5
    sizes = []
    for length in (5, 200):
        z, q, v = random_inputs(batch=1, heads=heads, length=length, rank=rank, value_dim=value_dim)
        _, state = echo_recurrent(z, q, v, 1.2, chunk_size=chunk_size, stats_dtype=stats_dtype)
        sizes.append([tuple(t.shape) for t in state.tensors()])
        assert sum(t.numel() for t in state.tensors()) == echo_state_numel(heads, rank, value_dim, chunk_size,
                                                                           stats_dtype)
    assert sizes[0] == sizes[1]
    _, prefilled = echo_chunked(z, q, v, 1.2, chunk_size=chunk_size, stats_dtype=stats_dtype, return_state=True)
    fresh = init_state(1, heads, rank, value_dim, chunk_size=chunk_size, stats_dtype=stats_dtype)
    assert [tuple(t.shape) for t in fresh.tensors()] == [tuple(t.shape) for t in prefilled.tensors()] == sizes[0]
    extra = 2 * heads * rank * rank if stats_dtype == torch.float32 else 0  # the Kahan carries of G and M
    assert echo_state_numel(heads, rank, value_dim, chunk_size, stats_dtype) == echo_state_numel(
        heads, rank, value_dim, chunk_size) + extra
    if chunk_size == 1:  # METHODS.md section 3: H (2 r^2 + P r + r + 1)
        methods_count = heads * (2 * rank**2 + value_dim * rank + rank + 1)
        assert echo_state_numel(heads, rank, value_dim, 1) == methods_count


def test_echo_step_returns_query_dtype_and_shapes():
    state = init_state(2, 3, 4, 5, chunk_size=1)  # K = 2: nothing to read until a lag pair exists
    for _ in range(3):
        y_t, state = echo_step(state, torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 5), 1.2)
    assert y_t.shape == (2, 3, 5) and y_t.dtype == torch.float32 and state.position == 3
    assert y_t.abs().max() > 0


def test_float32_statistics_agree_across_modes():
    z, q, v = random_inputs(length=65, seed=37, dtype=torch.float32)
    chunked = echo_chunked(z, q, v, 1.2, chunk_size=8, stats_dtype=torch.float32)
    recurrent, state = echo_recurrent(z, q, v, 1.2, chunk_size=8, stats_dtype=torch.float32)
    assert state.gram.dtype == torch.float32 and torch.isfinite(chunked).all()
    torch.testing.assert_close(recurrent, chunked, rtol=1e-3, atol=1e-3)


def low_rank_keys(length: int, rank: int = 16, inner: int = 4, seed: int = 41):
    """Keys in a 4-dimensional subspace of r = 16 (G is singular): the float32 sums' hard case."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 1, length, inner, generator=generator, dtype=F64) @ torch.randn(
        inner, rank, generator=generator, dtype=F64)
    q = z + 0.1 * torch.randn(z.shape, generator=generator, dtype=F64)
    v = torch.randn(1, 1, length, 8, generator=generator, dtype=F64)
    return z, q, v


def test_compensated_float32_decode_tracks_float64():
    """Kahan-compensated G and M keep float32 decode near float64 where plain float32 sums drift."""
    z, q, v = low_rank_keys(3000)
    _, reference = echo_recurrent(z, q, v, 1.2, chunk_size=64)
    q_last = q[:, :, -1]

    def readout_error(state):
        def read(s, dtype):
            readout = readout_operator(s.gram.to(dtype), s.lag.to(dtype), s.cross.to(dtype),
                                       torch.tensor(1.2, dtype=dtype), 2, 1e-3)
            return (readout @ q_last.to(dtype)[..., None]).double()
        expected = read(reference, F64)
        return ((read(state, torch.float32) - expected).norm() / expected.norm()).item()

    _, compensated = echo_recurrent(z.float(), q.float(), v.float(), 1.2, chunk_size=64, stats_dtype=torch.float32)
    plain_start = dataclasses.replace(init_state(1, 1, 16, 8, chunk_size=64, stats_dtype=torch.float32),
                                      gram_carry=None, lag_carry=None)
    _, plain = echo_recurrent(z.float(), q.float(), v.float(), 1.2, state=plain_start)
    assert compensated.gram_carry is not None and plain.gram_carry is None
    assert readout_error(compensated) < 2e-2
    assert readout_error(plain) > 5 * readout_error(compensated)


def test_rounding_left_indefinite_gram_gets_a_jitter_not_an_error():
    from graftlm.kernels.echo.reference import ridge_cholesky

    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))
    spectrum = torch.tensor([50.0, 10.0, 1.0, 0.1, 0.0, -2e-3])  # below -eps: G + eps I is indefinite
    gram = torch.stack([basis @ torch.diag(spectrum) @ basis.T, basis @ torch.diag(spectrum.abs()) @ basis.T])
    gram = ((gram + gram.mT) / 2).requires_grad_(True)
    eye = torch.eye(6)
    assert torch.linalg.cholesky_ex(gram[0].detach() + 1e-3 * eye).info > 0  # a plain factorization fails
    chol = ridge_cholesky(gram, 1e-3)
    assert torch.isfinite(chol).all()
    torch.testing.assert_close(chol[1], torch.linalg.cholesky(gram[1] + 1e-3 * eye))  # PD: untouched
    jitter = torch.finfo(torch.float32).eps ** 0.5 * gram[0].diagonal().abs().mean()
    torch.testing.assert_close(chol[0] @ chol[0].T, gram[0] + (1e-3 + jitter) * eye, atol=1e-4, rtol=1e-4)
    chol.sum().backward()
    assert torch.isfinite(gram.grad).all()
