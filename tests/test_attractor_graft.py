"""Attractor graft (METHODS.md section 2) on tiny random Llama and Gemma 3 models."""

import pytest
import torch
from graft_fixtures import build_tiny_model, graft_gradients
from test_attach import all_hooks
from transformers import DynamicCache

from graftlm import AttractorConfig, attach_adapter
from graftlm.adapters.attractor import AttractorGraft, attention_mask
from graftlm.kernels.fixed_point import unrolled_picard
from graftlm.kernels.fixed_point.memory import autograd_saved_bytes

IDS = torch.tensor(
    [[3, 17, 42, 9, 77, 5, 120, 33, 8, 61, 14], [5, 6, 90, 11, 2, 44, 71, 30, 99, 12, 7]]
)  # T = 11
SMALL = {"attn_heads": 2, "attn_head_dim": 8, "mlp_hidden": 32}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The solver runs many tiny ops; on a shared 2-core machine one thread is far faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family_of(model) -> str:
    return "llama" if model.config.model_type == "llama" else "gemma3"


def graft_of(model) -> AttractorGraft:
    return model.grafts["default"]


def open_head(model, scale=0.05, gate=0.5, seed=1, qk=1.0):
    """Open the head: gates to ``gate`` (times gamma_max), the zero output projections random."""
    generator = torch.Generator().manual_seed(seed)
    graft = graft_of(model)
    with torch.no_grad():
        for block in graft.head.blocks:
            raw = torch.logit(torch.tensor(gate))
            block.gate_attn_raw.fill_(raw)
            block.gate_mlp_raw.fill_(raw)
            for proj in (block.o_proj, block.down_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * scale)
            block.qkv_proj.weight.mul_(qk)
    return model


def attractor_model(tiny_model, **overrides):
    return attach_adapter(tiny_model, AttractorConfig(**{**SMALL, **overrides}))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fresh_adapter_reproduces_base_exactly(tiny_model):
    before = logits(tiny_model)
    model = attractor_model(tiny_model, n_fp_blocks=2)
    assert torch.equal(logits(model), before)
    assert int(graft_of(model).last_solve_info["iterations"].sum()) == 0  # closed head: no solve
    model.train()  # with grad the solve runs, and its fixed point is still c exactly
    out = model(input_ids=IDS, labels=IDS)
    assert torch.equal(out.logits.detach(), before)
    out.loss.backward()
    grads = {name: p.grad for name, p in graft_of(model).named_parameters()}
    assert grads["head.blocks.0.o_proj.weight"].abs().sum() > 0  # the zero projections get a gradient


def test_a_head_opened_through_data_writes_is_not_taken_for_closed(tiny_model):
    """Writes through ``.data`` bypass the version counters: a head read as closed once must not stay
    closed after them (it used to, and returned the base's logits)."""
    before = logits(tiny_model)
    model = attractor_model(tiny_model, n_fp_blocks=2)
    assert torch.equal(logits(model), before)
    generator = torch.Generator().manual_seed(0)
    for block in graft_of(model).head.blocks:
        for weight in (block.o_proj.weight, block.down_proj.weight):
            weight.data.copy_(0.05 * torch.randn(weight.shape, generator=generator))
    assert not torch.equal(logits(model), before)


def test_open_head_changes_logits_finitely_and_every_parameter_gets_a_gradient(tiny_model):
    before = logits(tiny_model)
    model = open_head(attractor_model(tiny_model, n_fp_blocks=2))
    after = logits(model)
    assert torch.isfinite(after).all() and not torch.allclose(after, before, atol=1e-4)
    info = graft_of(model).last_solve_info
    assert info["converged"].all() and not info["fallback"].any() and info["iterations"].min() >= 6
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, p in graft_of(model).named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_implicit_gradients_match_unrolled_backprop(tiny_model):
    model = open_head(
        attractor_model(
            tiny_model,
            tol=1e-6,
            max_iter=60,
            min_iter=0,
            backward="anderson",
            adjoint_tol=1e-7,
            adjoint_max_iter=60,
        )
    )
    model.train()
    graft = graft_of(model)

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=IDS, labels=IDS).loss.backward()
        return torch.cat([p.grad.flatten() for p in graft.parameters()])

    implicit = grads()
    assert graft.last_solve_info["converged"].all()

    def unrolled(c):  # the same head, differentiated through 40 plain iterations
        mask = attention_mask(c.shape[0], c.shape[1], 0, None, c.device)
        return unrolled_picard(lambda y: graft.head(y, c, mask), c, 40)

    graft.refine = unrolled
    reference = grads()
    del graft.refine
    cosine = torch.nn.functional.cosine_similarity(implicit, reference, dim=0)
    assert cosine > 0.99, float(cosine)


def test_prefill_then_decode_equals_full_forward(tiny_model):
    model = open_head(
        attractor_model(tiny_model, tol=1e-6, max_iter=100, min_iter=0, n_fp_blocks=2), scale=0.03, gate=0.3
    )
    full = logits(model)
    assert graft_of(model).last_solve_info["converged"].all()
    cache = DynamicCache(config=tiny_model.config)
    steps = []
    with torch.no_grad():
        steps.append(model(input_ids=IDS[:, :6], past_key_values=cache, use_cache=True).logits)
        for t in range(6, IDS.shape[1]):
            steps.append(model(input_ids=IDS[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
            assert graft_of(model).last_solve_info["converged"].all()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    per_call = AttractorGraft.cache_iterations(cache)
    assert len(per_call) == 1 + IDS.shape[1] - 6 and all(n.shape == (2,) and (n > 0).all() for n in per_call)


def test_left_padded_prefill_then_decode_equals_full_forward(tiny_model):
    model = open_head(attractor_model(tiny_model, tol=1e-6, max_iter=100, min_iter=0), scale=0.03, gate=0.3)
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second sequence is left-padded
    ids[1, :3] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        cache = DynamicCache(config=tiny_model.config)
        steps = [
            model(
                input_ids=ids[:, :7], attention_mask=mask[:, :7], past_key_values=cache, use_cache=True
            ).logits
        ]
        for t in range(7, ids.shape[1]):
            out = model(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-4)
    other = ids.clone()
    other[1, :3] = 77  # what sits under the padding must not matter (the head masks padded keys)
    torch.testing.assert_close(logits_masked(model, other, mask)[real], full[real], rtol=1e-4, atol=1e-4)


def logits_masked(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_generate_uses_the_head_cache(tiny_model):
    model = open_head(attractor_model(tiny_model, tol=1e-6, max_iter=100, min_iter=0), scale=0.03, gate=0.3)
    prompt = IDS[:1, :5]
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
    )
    ids = prompt
    for _ in range(4):  # greedy by full forwards, no cache
        ids = torch.cat([ids, logits(model, ids)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


def test_save_and_reload_is_exact(tiny_model, tmp_path):
    model = open_head(attractor_model(tiny_model, lora_r=2))
    with torch.no_grad():
        for p in graft_of(model).lora.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = attach_adapter(build_tiny_model(family_of(tiny_model)), tmp_path)
    assert torch.equal(logits(reloaded), expected)
    keys = graft_of(reloaded).adapter_state_dict()
    assert any(k.startswith("lora.") for k in keys) and any(k.startswith("head.") for k in keys)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    model = open_head(attractor_model(tiny_model, lora_r=2))
    model.train()

    plain = graft_gradients(model, IDS)
    model.gradient_checkpointing_enable()
    checkpointed = graft_gradients(model, IDS)
    assert len(plain) == len(checkpointed) and sum(g.abs().sum() > 0 for g in plain) > len(plain) // 2
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_detach_and_disable_are_exact(tiny_model):
    before = logits(tiny_model)
    hooks = all_hooks(tiny_model)
    model = open_head(attractor_model(tiny_model, lora_r=2))
    with model.disable_adapter():
        assert torch.equal(logits(model), before)
    base = model.detach()
    assert torch.equal(logits(base), before) and all_hooks(base) == hooks


def test_diverging_head_gives_finite_logits_and_a_fallback_flag(tiny_model):
    model = open_head(
        attractor_model(tiny_model, gamma_max=100.0, gamma_init=1.0, max_iter=12),
        scale=3.0,
        gate=0.99,
        qk=30.0,
    )  # huge gates: the iteration wanders, never settles
    out = logits(model)
    info = graft_of(model).last_solve_info
    assert torch.isfinite(out).all()
    assert not info["converged"].any() and info["fallback"].any()


def test_overflowing_head_falls_back_to_the_base_logits(tiny_model):
    before = logits(tiny_model)
    model = open_head(attractor_model(tiny_model, gamma_max=3e38, gamma_init=1.0), scale=1e30, gate=0.99)
    out = logits(model)  # g(c) overflows to inf: the solver returns y0 = c and flags it
    info = graft_of(model).last_solve_info
    assert torch.isfinite(out).all() and info["fallback"].all() and not info["converged"].any()
    assert torch.equal(out, before)


def test_jacobian_regulariser_enters_the_training_loss(tiny_model):
    model = open_head(attractor_model(tiny_model, jacobian_weight=0.0))
    terms = graft_of(model).training_loss(model, {"input_ids": IDS})
    assert "jacobian_loss" not in terms and torch.equal(terms["loss"].detach(), terms["lm_loss"])
    model = open_head(attractor_model(build_tiny_model(family_of(tiny_model))))
    assert graft_of(model).config.jacobian_weight == 1e-3  # on by default (METHODS.md section 2)
    model.train()
    terms = graft_of(model).training_loss(model, {"input_ids": IDS})
    assert terms["jacobian_loss"] > 0
    torch.testing.assert_close(terms["loss"].detach(), terms["lm_loss"] + 1e-3 * terms["jacobian_loss"])
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.graft_parameters())


def test_config_validation():
    with pytest.raises(ValueError):
        AttractorConfig(gamma_init=0.0)
    with pytest.raises(ValueError):
        AttractorConfig(backward="exact")


def test_iteration_budget_reports_the_first_guess_residual(tiny_model):
    base = logits(tiny_model)
    model = open_head(attractor_model(tiny_model))
    graft = graft_of(model)
    with graft.iteration_budget(0):
        at_zero = logits(model)
        first_guess = graft.last_solve_info["residual"]
    assert torch.equal(at_zero, base)  # zero iterations: y* = c, the base logits
    assert (first_guess > 0).all() and graft.config.max_iter == 32
    full = logits(model)
    assert (graft.last_solve_info["residual"] < first_guess).all() and not torch.equal(full, at_zero)


def test_training_memory_does_not_grow_with_iterations(tiny_model):
    model = open_head(attractor_model(tiny_model, tol=0.0))
    model.train()
    graft = graft_of(model)

    def saved_bytes(n):
        graft.config.min_iter = graft.config.max_iter = n
        saved = autograd_saved_bytes(lambda: model(input_ids=IDS, labels=IDS).loss.backward())
        assert int(graft.last_solve_info["iterations"].min()) == n
        return saved

    assert saved_bytes(1) == saved_bytes(8) == saved_bytes(24)


def test_a_few_training_steps_lower_the_loss(tiny_model):
    model = attractor_model(tiny_model, max_iter=12, backward="one_step", adjoint_clip=2.0)
    model.train()
    optimizer = torch.optim.Adam(model.graft_parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert torch.isfinite(torch.tensor(losses)).all()


# -- issue 14: contraction control, visible convergence, the one-application control ------------------


def test_contraction_control_is_on_by_default():
    config = AttractorConfig()
    assert config.jacobian_weight == 1e-3 and config.adjoint_clip == 2.0 and config.gamma_max == 1.0
    solver = config.solver_config(1)
    assert solver.per_position and solver.adjoint_clip == 2.0


def test_solve_is_judged_per_position(tiny_model):
    model = open_head(attractor_model(tiny_model, tol=1e-4, min_iter=0), scale=0.05, gate=0.5)
    graft = graft_of(model)
    seen = {}
    norm = graft.patch.final_norm(graft.base_model)
    handle = norm.register_forward_pre_hook(lambda module, args: seen.setdefault("y", args[0]))
    with graft.iteration_budget(0):
        logits(model)
    handle.remove()
    c = seen.pop("y")
    handle = norm.register_forward_pre_hook(lambda module, args: seen.setdefault("y", args[0]))
    logits(model)
    handle.remove()
    info = graft.last_solve_info
    mask = attention_mask(c.shape[0], c.shape[1], 0, None, c.device)
    with torch.no_grad():
        y = seen["y"]
        per_position = (graft.head(y, c, mask) - y).norm(dim=-1) / y.norm(dim=-1)  # [B, T]
        first = (graft.head(c, c, mask) - c).norm(dim=-1) / c.norm(dim=-1)
    assert info["converged"].all() and (per_position < 1e-4).all()
    torch.testing.assert_close(info["residual"], per_position.amax(-1), rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(info["first_guess_residual"], first.amax(-1), rtol=1e-4, atol=1e-7)


def test_training_loss_logs_the_convergence_figures(tiny_model):
    from graftlm.recipes.objective import TrainingObjective

    model = open_head(attractor_model(tiny_model, max_iter=20))
    model.train()
    graft = graft_of(model)
    terms = TrainingObjective(model)({"input_ids": IDS})  # the loop's terms: the loss and every statistic
    info = graft.last_solve_info
    assert terms["solve_converged"] == info["converged"].float().mean() == 1.0
    assert terms["solve_fallback"] == 0.0 and terms["solve_hit_max_iter"] == 0.0
    assert terms["solve_iterations_max"] == info["iterations"].max() >= terms["solve_iterations_mean"] >= 6
    assert 0 < terms["solve_first_guess_residual"] and terms["solve_residual_max"] < graft.config.tol
    assert all(v.dim() == 0 and not v.requires_grad for k, v in terms.items() if k != "loss")


def test_repeated_max_iter_hits_warn_in_the_log(tiny_model, caplog):
    from graftlm.recipes.objective import TrainingObjective

    model = open_head(attractor_model(tiny_model, tol=1e-12, min_iter=0, max_iter=3, jacobian_weight=0.0))
    model.train()
    graft, objective = graft_of(model), TrainingObjective(model)
    with caplog.at_level("WARNING", logger="graftlm.adapters.attractor"):
        for step in range(1, 12):
            graft.on_train_step(step, 20)
            terms = objective({"input_ids": IDS})
    assert terms["solve_hit_max_iter"] == 1.0 and terms["solve_converged"] == 0.0
    assert len(caplog.records) == 1 and "10 of the last 10 training steps" in caplog.records[0].getMessage()
    caplog.clear()
    graft.config.tol, graft.config.max_iter = 1e-3, 30  # a solve that converges: no warning
    with caplog.at_level("WARNING", logger="graftlm.adapters.attractor"):
        for step in range(12, 24):
            graft.on_train_step(step, 30)
            objective({"input_ids": IDS})
    assert not caplog.records


def test_one_application_control_is_the_head_applied_once(tiny_model):
    base = logits(tiny_model)
    fresh = attractor_model(tiny_model, iterate="unrolled", max_iter=1, min_iter=0)
    assert torch.equal(logits(fresh), base)  # exact at init in this mode too
    fresh.train()
    fresh(input_ids=IDS, labels=IDS).loss.backward()
    assert graft_of(fresh).head.blocks[0].o_proj.weight.grad.abs().sum() > 0  # it can open
    fresh.detach()
    model = open_head(attractor_model(tiny_model, iterate="unrolled", max_iter=1, min_iter=0))
    graft = graft_of(model)
    seen = {}
    norm = graft.patch.final_norm(graft.base_model)
    handle = norm.register_forward_pre_hook(lambda module, args: seen.setdefault("c", args[0]))
    with graft.iteration_budget(0):
        logits(model)
    handle.remove()
    c = seen["c"]
    mask = attention_mask(c.shape[0], c.shape[1], 0, None, c.device)
    with torch.no_grad():
        once = tiny_model.lm_head(norm.forward(graft.head(c, c, mask)))  # .forward: without the hook
    torch.testing.assert_close(logits(model), once, rtol=0, atol=0)
    info = graft.last_solve_info
    assert (info["iterations"] == 1).all() and (info["residual"] > 0).all() and (info["first_guess_residual"] > 0).all()
    model.train()  # plain backprop through the one pass: its gradient is that of g(c)
    model.zero_grad(set_to_none=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert graft.last_fixed_point_info is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in graft.head.parameters())


@pytest.mark.parametrize("passes", [1, 3])
def test_unrolled_prefill_then_decode_equals_full_forward(tiny_model, passes):
    model = open_head(attractor_model(tiny_model, iterate="unrolled", max_iter=passes, min_iter=0, n_fp_blocks=2),
                      scale=0.3, gate=0.5)
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        cache = DynamicCache(config=tiny_model.config)
        steps = [model(input_ids=ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache,
                       use_cache=True).logits]
        for t in range(6, ids.shape[1]):
            steps.append(model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                               use_cache=True).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-5, atol=1e-5)
    with graft_of(model).config_overrides({"iterate": "fixed_point"}), pytest.raises(RuntimeError, match="mode"):
        model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
