"""SST latent deliberation and the halting probe that sets its depth (METHODS.md section 1).

Deliberation: at the first answer position (the last prompt token) the forward pass runs 1..D times;
each repeat overwrites that position's KV entry (the cache is cropped by one token) and starts from the
states the previous repeat left, so the state "thinks" for D steps before the first answer token is
emitted from the last repeat. Decoding then continues normally (exact recurrence, one pass per token).

Halting probe (ours; the paper only demonstrated one): a linear softmax over depths 1..D_max that reads
the states at the first answer position after one pass, ``features = mean_l rms_normalise(s_l)`` [B, d].
It is fitted from runs at every depth on training questions, labelled with the smallest depth that
answers correctly (questions no depth answers are labelled depth 1, the cheapest), and at inference it
picks each sequence's depth. Its weights are buffers of the SST graft, saved in the same adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graftlm.adapters.sst import SSTGraft
from graftlm.patches.cache_kwarg import with_cache


@dataclass
class DeliberationOutput:
    sequences: torch.Tensor  # [B, T_prompt + new] prompt and greedy continuation
    depths: torch.Tensor  # [B] depth used per sequence
    features: torch.Tensor  # [B, d] probe features at the first answer position (after one pass)
    first_logits: torch.Tensor  # [B, V] logits of the first answer token (after the last repeat)


def sst_graft_of(model) -> SSTGraft:
    grafts = [g for g in model.grafts.values() if isinstance(g, SSTGraft)]
    if not grafts:
        raise ValueError("the model has no SST graft attached")
    return grafts[0]


def probe_features(states: dict[int, torch.Tensor]) -> torch.Tensor:
    """Mean over grafted layers of RMS-normalised states: [B, d]."""
    stacked = torch.stack([s.float() for s in states.values()])
    return (stacked * torch.rsqrt(stacked.pow(2).mean(-1, keepdim=True) + 1e-6)).mean(0)


def probe_depths(graft: SSTGraft, features: torch.Tensor) -> torch.Tensor:
    """The probe's depth per sequence in 1..max_deliberation: [B] long."""
    scores = features @ graft.probe_weight.T + graft.probe_bias
    return scores.argmax(-1) + 1


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` makes them for left padding: cumulative count of real tokens - 1."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate_with_deliberation(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 16,
    depth: int | str | torch.Tensor = 1,
    eos_token_id: int | None = None,
) -> DeliberationOutput:
    """Greedy generation with latent deliberation at the first answer position.

    ``depth``: an int (fixed), a [B] tensor (per sequence), or ``"probe"`` (the halting probe decides
    after the first pass). Left-padded batches are supported (pass ``attention_mask``).
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    cache = _prefill(model, input_ids, mask)
    return _deliberate_and_decode(model, cache, input_ids, mask, depth, max_new_tokens, eos_token_id)


@torch.no_grad()
def generate_at_depths(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 16,
    depths: Sequence[int] = (1, 2, 3, 4),
    eos_token_id: int | None = None,
) -> list[DeliberationOutput]:
    """`generate_with_deliberation` at each fixed depth of ``depths``, from one prefill of the prompt (each
    depth continues a copy of the prefilled cache): the same outputs for a fraction of the prefill cost."""
    import copy

    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    cache = _prefill(model, input_ids, mask)
    return [_deliberate_and_decode(model, copy.deepcopy(cache), input_ids, mask, depth, max_new_tokens, eos_token_id)
            for depth in depths]


def _prefill(model, input_ids: torch.Tensor, mask: torch.Tensor):
    """The generation cache after every prompt token but the last (KV entries and every graft's state)."""
    cache = model.make_cache()
    cache.activate_past_recording()  # sliding-window layers (Gemma 3) and states must be able to crop the repeat
    if input_ids.shape[1] > 1:
        model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], **with_cache({}, cache), use_cache=True,
              position_ids=_positions(mask)[:, :-1])
    return cache


def _deliberate_and_decode(model, cache, input_ids: torch.Tensor, mask: torch.Tensor,
                           depth: int | str | torch.Tensor, max_new_tokens: int,
                           eos_token_id: int | None) -> DeliberationOutput:
    """From a cache prefilled with all but the last prompt token: run the last token ``depth`` times
    (repeats overwrite its KV entry and carry the states), then decode greedily."""
    graft = sst_graft_of(model)
    batch = input_ids.shape[0]
    last, position = input_ids[:, -1:], _positions(mask)[:, -1:]
    entry_states = graft.cache_states(cache)

    def one_pass(states):
        graft.set_cache_states(cache, states)
        out = model(input_ids=last, attention_mask=mask, **with_cache({}, cache), use_cache=True,
                    position_ids=position)
        return out.logits[:, -1], graft.cache_states(cache)

    logits, states = one_pass(entry_states)
    features = probe_features(states)
    if isinstance(depth, str):
        if depth != "probe":
            raise ValueError(f"depth must be an int, a tensor or 'probe', not {depth!r}")
        depths = probe_depths(graft, features)
    else:
        depths = torch.as_tensor(depth, device=input_ids.device).expand(batch).clone()
    if int(depths.min()) < 1 or int(depths.max()) > graft.config.max_deliberation:
        raise ValueError(f"deliberation depth must lie in 1..{graft.config.max_deliberation}")

    final_logits, final_states, carried = logits, states, states
    for repeat in range(2, int(depths.max()) + 1):
        cache.crop(-1)
        deliberating = (depths >= repeat)[:, None]
        # Rows already at their depth repeat their last pass unchanged (same input states, same KV).
        inputs = {k: torch.where(deliberating, carried[k], entry_states.get(k, torch.zeros_like(carried[k])))
                  for k in carried}
        logits, states = one_pass(inputs)
        final_logits = torch.where(deliberating, logits, final_logits)
        final_states = {k: torch.where(deliberating, states[k], final_states[k]) for k in states}
        entry_states = inputs
        carried = states
    graft.set_cache_states(cache, final_states)
    cache.deactivate_past_recording()  # deliberation is over: trim sliding-window layers back to their window

    generated = [final_logits.argmax(-1, keepdim=True)]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None:
            finished |= generated[-1][:, 0] == eos_token_id
            if bool(finished.all()):
                break
        mask = torch.cat([mask, torch.ones_like(generated[-1])], dim=1)
        out = model(input_ids=generated[-1], attention_mask=mask, **with_cache({}, cache), use_cache=True,
                    position_ids=_positions(mask)[:, -1:])
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        if eos_token_id is not None:
            next_id = torch.where(finished[:, None], torch.full_like(next_id, eos_token_id), next_id)
        generated.append(next_id)
    return DeliberationOutput(torch.cat([input_ids, *generated], dim=1), depths, features, final_logits)


@torch.no_grad()
def collect_depth_labels(
    model,
    tokenizer,
    prompts: Sequence[str],
    is_correct: Callable[[int, str], bool],
    max_new_tokens: int = 8,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Run every depth 1..max_deliberation on each prompt (one prefill per batch). Returns ``features``
    [N, d] (after one pass), ``correct`` [N, D_max] (bool), ``labels`` [N] (smallest correct depth; 1 when
    no depth answers), ``completions`` (N lists of D_max texts), and how near the first answer token was to
    changing: ``first_margin`` [N, D_max] (its top-1 minus top-2 logit) and ``first_shift`` [N, D_max] (the
    largest change of any of its logits from depth 1)."""
    graft = sst_graft_of(model)
    max_depth = graft.config.max_deliberation
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    features, correct, completions, margins, shifts = [], [], [], [], []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            encoded = tokenizer(chunk, return_tensors="pt", padding=True)
            outs = generate_at_depths(model, encoded.input_ids, encoded.attention_mask, max_new_tokens,
                                      range(1, max_depth + 1), tokenizer.eos_token_id)
            features.append(outs[0].features)
            texts = [tokenizer.batch_decode(o.sequences[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)
                     for o in outs]
            completions += [list(row) for row in zip(*texts)]
            correct.append(torch.tensor([[is_correct(start + i, text) for i, text in enumerate(t)] for t in texts]).T)
            logits = torch.stack([o.first_logits.float() for o in outs], dim=1)  # [b, D, V]
            top = logits.topk(2, dim=-1).values
            margins.append(top[..., 0] - top[..., 1])
            shifts.append((logits - logits[:, :1]).abs().amax(-1))
    finally:
        tokenizer.padding_side = padding_side
    correct_t = torch.cat(correct)
    first = torch.where(correct_t.any(1), correct_t.float().argmax(1) + 1, torch.ones(len(correct_t), dtype=torch.long))
    return {"features": torch.cat(features), "correct": correct_t, "labels": first.long(), "completions": completions,
            "first_margin": torch.cat(margins), "first_shift": torch.cat(shifts)}


def fit_halting_probe(graft: SSTGraft, features: torch.Tensor, labels: torch.Tensor, steps: int = 300,
                      lr: float = 0.05, weight_decay: float = 1e-3) -> float:
    """Fit the probe (softmax regression of ``labels`` in 1..D_max on ``features`` [N, d]) into the graft's
    buffers; returns the training accuracy."""
    classes = graft.config.max_deliberation
    probe = nn.Linear(features.shape[1], classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    targets = labels.long() - 1
    x = features.float()
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(probe(x), targets).backward()
            optimizer.step()
    with torch.no_grad():
        graft.probe_weight.copy_(probe.weight)
        graft.probe_bias.copy_(probe.bias)
        return float((probe(x).argmax(-1) == targets).float().mean())
