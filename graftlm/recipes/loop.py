"""THE training loop: trains only the graft parameters of a `GraftModel`, on one device or many processes.

Built on `accelerate.Accelerator`, so the same code runs on a CPU, one GPU, or several processes started
by ``accelerate launch`` (DDP; on a machine without GPUs the processes use gloo on the CPU). Everything a
run needs is checked before the first step (`RecipeError` otherwise); nothing is written before that.

Per optimizer step: ``grad_accum`` micro-batches go through `TrainingObjective` (a graft's
``training_loss`` hook, else the LM loss) inside ``accelerator.accumulate``; each micro-batch's loss is
weighted by its share of the step's answer tokens, so accumulating k micro-batches of b examples gives
the same step as one batch of k*b (exactly the token mean within a process; across processes DDP averages
the per-process means). Then gradient clipping, the optimizer and the LR schedule step.

DDP: parameters with ``requires_grad=False`` (the whole frozen base) are not synchronised; the module DDP
wraps is the `TrainingObjective`, so every forward a graft's hook runs happens inside DDP's forward.
``train.find_unused_parameters`` (default true) lets grafts leave some of their parameters unused in a
step (e.g. a gate that skips a branch) at a small per-step cost; set it false for speed when every graft
parameter always gets a gradient.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters import GraftModel, attach_adapter
from graftlm.recipes.batches import BatchPlan
from graftlm.recipes.checkpoint import (
    checkpoint_dir,
    full_adapter_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from graftlm.recipes.config import Recipe, RecipeError, TrainSection
from graftlm.recipes.data import (
    PaddingCollator,
    PromptAnswer,
    TrainingText,
    as_training_texts,
    count_label_tokens,
    pack_texts,
    tokenize_texts,
)
from graftlm.recipes.objective import TrainingObjective
from graftlm.recipes.run_log import RunLog
from graftlm.recipes.sources import load_training_data


@dataclass
class TrainResult:
    model: GraftModel
    summary: dict[str, Any]
    output_dir: Path


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` -> bf16 on a GPU that supports it, else none (CPU)."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(settings: TrainSection):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

    # cpu=True on a machine without an accelerator makes `accelerate launch` processes join as MULTI_CPU (gloo).
    return Accelerator(
        cpu=torch.accelerator.current_accelerator() is None,
        mixed_precision=resolve_mixed_precision(settings.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=settings.grad_accum, sync_with_dataloader=False
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=settings.find_unused_parameters)],
    )


def attach_grafts(model: nn.Module, recipe: Recipe) -> GraftModel:
    """Attach every graft of the recipe; a graft that doesn't fit the model raises `RecipeError`."""
    graft_model = model
    for spec in recipe.grafts:
        try:
            graft_model = attach_adapter(graft_model, copy.deepcopy(spec.config), spec.adapter_name)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as err:
            raise RecipeError(
                f"graft {spec.adapter_name!r} (type {spec.type!r}) does not fit model {recipe.model.name!r}: {err}"
            ) from err
    return graft_model


def total_steps(settings: TrainSection, plan: BatchPlan) -> int:
    if settings.steps is not None:
        return settings.steps
    epochs = settings.epochs if settings.epochs is not None else 1.0
    return max(1, math.ceil(epochs * plan.batches_per_epoch / settings.grad_accum))


def parameter_groups(graft_model: GraftModel, lr: float) -> list[dict[str, Any]]:
    """The optimizer groups of every graft (`Graft.parameter_groups`), trainable parameters only."""
    groups = []
    for graft in graft_model.grafts.values():
        for group in graft.parameter_groups(lr):
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                groups.append({**group, "params": params})
    return groups


def make_optimizer(parameters: list[nn.Parameter] | list[dict[str, Any]], settings: TrainSection
                   ) -> torch.optim.Optimizer:
    """SGD or AdamW over ``parameters`` (a list of tensors, or of groups that may set their own ``lr``)."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(
        parameters, lr=settings.lr, weight_decay=settings.weight_decay, betas=tuple(settings.adam_betas)
    )


def load_base(recipe: Recipe):
    from graftlm.models import load_model

    try:
        return load_model(
            recipe.model.name, dtype=recipe.model.dtype, attn_implementation=recipe.model.attn_implementation
        )
    except (OSError, ValueError, ModuleNotFoundError) as err:
        raise RecipeError(f"model.name: cannot load {recipe.model.name!r}: {err}") from err


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _batch_of(dataset, indices: list[int], collator: PaddingCollator) -> dict[str, torch.Tensor]:
    return collator([dataset[i] for i in indices])


def evaluate_loss(graft_model: GraftModel, dataset, collator, batch_size: int, accelerator) -> float:
    """Token-weighted plain LM loss on a held-out set (comparable across graft kinds), over all processes."""
    was_training = graft_model.training
    graft_model.eval()
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for start in range(0, len(mine), batch_size):
            batch = _batch_of(dataset, mine[start : start + batch_size], collator)
            n = count_label_tokens(batch)  # counted on the host batch: no device read
            batch = _to_device(batch, accelerator.device)
            totals[0] += graft_model(**batch).loss.double() * n
            totals[1] += n
    totals = accelerator.reduce(totals, reduction="sum")
    graft_model.train(was_training)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


class _Meter:
    """Sums of a few quantities since the last log line, reduced over processes when read.

    Losses and logged terms stay on the device until `read` (one host sync per log line, not per step).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss: torch.Tensor | float = 0.0
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0
        self.extras: dict[str, torch.Tensor | float] = {}

    def add_step(self, loss: torch.Tensor | float, tokens: int, seconds: float,
                 extras: dict[str, torch.Tensor | float]) -> None:
        self.loss = self.loss + loss
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        for key, value in extras.items():
            self.extras[key] = self.extras.get(key, 0.0) + value

    def read(self, accelerator) -> dict[str, float]:
        keys = sorted(self.extras)
        device = accelerator.device
        parts = [self.loss / self.steps, float(self.tokens)] + [self.extras[k] / self.steps for k in keys]
        local = torch.stack([torch.as_tensor(p, device=device).to(torch.float64).reshape(()) for p in parts])
        total = accelerator.reduce(local, reduction="sum").tolist()
        processes = accelerator.num_processes
        values = {"loss": total[0] / processes, "tokens": int(total[1])}
        values["tokens_per_s"] = values["tokens"] / self.seconds if self.seconds > 0 else float("nan")
        values.update({k: v / processes for k, v in zip(keys, total[2:])})
        return values


def tokenize_data(texts: list[TrainingText], tokenizer: Any, recipe: Recipe, what: str = "training set"):
    """The tokenized dataset of ``texts``: one row each, except the texts to pack (those of a source with
    ``packing``, and plain texts given directly when ``data.packing``), which become blocks of ``max_length``
    tokens. With both kinds (a ``data.mix``) the blocks come first, then the rows."""
    from datasets import concatenate_datasets

    packed = lambda t: t.pack or (recipe.data.packing and t.prompt == "")
    parts = []
    if any(packed(t) for t in texts):
        parts.append(pack_texts([t.prompt + t.completion for t in texts if packed(t)], tokenizer,
                                recipe.data.max_length, what))
    if not texts or not all(packed(t) for t in texts):
        parts.append(tokenize_texts([t for t in texts if not packed(t)], tokenizer, recipe.data.max_length, what))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _detached(value: Any) -> torch.Tensor | float:
    """A logged term as a device scalar (read later, with the others, by `_Meter.read`)."""
    return value.detach().float() if isinstance(value, torch.Tensor) else float(value)


def train(
    recipe: Recipe,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    train_examples: list[TrainingText | PromptAnswer] | None = None,
    eval_examples: list[TrainingText | PromptAnswer] | None = None,
) -> TrainResult:
    """Run a recipe: attach its grafts, train them, save ``output_dir/adapter`` and ``train_summary.json``.

    ``model`` / ``tokenizer``: a base model to use instead of loading ``recipe.model.name``.
    ``train_examples`` / ``eval_examples``: `TrainingText`s (or (prompt, answer) examples, joined as
    written) instead of ``recipe.data``'s source.
    Raises `RecipeError` before training when anything doesn't fit.
    """
    settings = recipe.train
    accelerator = make_accelerator(settings)
    from accelerate.utils import set_seed

    if model is not None and tokenizer is None:
        raise RecipeError("train(): a model was given without its tokenizer")
    needs_tokenizer = recipe.data.messages_field is not None  # chat rendering; other data is checked first
    if train_examples is None and not needs_tokenizer:
        train_examples, eval_examples = load_training_data(recipe.data)
    if model is None:
        model, tokenizer = load_base(recipe)
    if train_examples is None:
        train_examples, eval_examples = load_training_data(recipe.data, tokenizer)
    answer_end = "eos" if recipe.data.answer_end == "auto" else recipe.data.answer_end
    train_set = tokenize_data(as_training_texts(train_examples, answer_end), tokenizer, recipe)
    eval_set = None
    if eval_examples:
        eval_set = tokenize_data(as_training_texts(eval_examples, answer_end), tokenizer, recipe, "held-out set")
    set_seed(settings.seed)
    graft_model = attach_grafts(model, recipe)
    if not any(True for _ in graft_model.graft_parameters()):
        raise RecipeError("graft: the recipe's grafts have no trainable parameters")
    plan = BatchPlan(len(train_set), settings.batch_size, accelerator.num_processes, accelerator.process_index,
                     settings.seed)
    steps = total_steps(settings, plan)
    resume_dir = _resume_directory(recipe)

    output_dir = Path(recipe.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(recipe.to_yaml())
    log = RunLog(recipe.log_path, accelerator.is_main_process, append=resume_dir is not None)

    if settings.gradient_checkpointing:
        graft_model.activation_checkpointing_enable()
    previous_use_cache = getattr(graft_model.config, "use_cache", None)
    graft_model.config.use_cache = False
    graft_model.to(accelerator.device)
    graft_model.train()

    parameters = list(graft_model.graft_parameters())
    optimizer = make_optimizer(parameter_groups(graft_model, settings.lr), settings)
    from transformers import get_scheduler

    scheduler = get_scheduler(settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=steps)
    start_step = 0
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, graft_model, optimizer, scheduler, recipe.to_dict(),
                                accelerator.process_index)
        start_step = state.step
        set_rng_state(state.rng)

    objective, optimizer = accelerator.prepare(TrainingObjective(graft_model), optimizer)
    collator = PaddingCollator(getattr(tokenizer, "pad_token_id", None))
    micro_batches = plan.iterate(start_step * settings.grad_accum)

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start_step, desc="train", unit="step",
               disable=not (accelerator.is_main_process and settings.progress_bar))
    meter, totals = _Meter(), {"tokens": 0, "seconds": 0.0}
    last: dict[str, float] = {}
    eval_loss, first_step_s = float("nan"), None
    started = time.perf_counter()
    for step in range(start_step + 1, steps + 1):
        step_started = time.perf_counter()
        for graft in graft_model.grafts.values():
            graft.on_train_step(step, steps)
        window = [_batch_of(train_set, next(micro_batches), collator) for _ in range(settings.grad_accum)]
        window_tokens = sum(count_label_tokens(b) for b in window)
        loss_sum, extras, seen = 0.0, {}, 0
        for batch in window:
            share = count_label_tokens(batch) / window_tokens if window_tokens else 1 / len(window)
            seen += int(batch["attention_mask"].sum())  # host batches: no device read
            batch = _to_device(batch, accelerator.device)
            with accelerator.accumulate(objective):
                terms = objective(batch)
                accelerator.backward(terms["loss"] * (share * len(window)))
                if accelerator.sync_gradients and settings.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(parameters, settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            loss_sum = loss_sum + _detached(terms["loss"]) * share
            for key, value in terms.items():
                if key != "loss":
                    extras[key] = extras.get(key, 0.0) + _detached(value) / len(window)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.perf_counter() - step_started
        meter.add_step(loss_sum, seen, seconds, extras)
        first_step_s = seconds if step == start_step + 1 else first_step_s
        totals["seconds"] += seconds
        bar.update(1)

        is_last = step == steps
        evaluate = eval_set is not None and (is_last or (settings.eval_every and step % settings.eval_every == 0))
        if is_last or evaluate or step % settings.log_every == 0:
            last = meter.read(accelerator)
            totals["tokens"] += last["tokens"]
            meter.reset()
            record = {"step": step, "loss": last["loss"], "lr": lr, "tokens_per_s": last["tokens_per_s"],
                      "tokens": totals["tokens"], "elapsed_s": time.perf_counter() - started}
            record.update({k: v for k, v in last.items() if k not in ("loss", "tokens", "tokens_per_s")})
            if evaluate:
                eval_loss = evaluate_loss(graft_model, eval_set, collator, settings.batch_size, accelerator)
                record["eval_loss"] = eval_loss
            log.write(record)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if settings.checkpoint_every and step % settings.checkpoint_every == 0:
            save_checkpoint(checkpoint_dir(output_dir, step), graft_model, optimizer, scheduler, step,
                            recipe.to_dict(), accelerator, full_adapter_state(accelerator, objective))
    bar.close()
    wall = time.perf_counter() - started

    graft_model.config.use_cache = previous_use_cache
    graft_model.eval()
    trainable, total = graft_model.get_nb_trainable_parameters()
    summary = {
        "steps": steps,
        "start_step": start_step,
        "final_loss": last.get("loss"),
        "final_eval_loss": eval_loss if eval_set is not None else None,
        "tokens": totals["tokens"],
        "tokens_per_s": totals["tokens"] / totals["seconds"] if totals["seconds"] > 0 else None,
        "wall_time_s": wall,
        "first_step_s": first_step_s,
        "trainable_params": trainable,
        "total_params": total,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set) if eval_set is not None else 0,
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(resume_dir) if resume_dir else None,
        "adapter_dir": str(output_dir / "adapter"),
    }
    accelerator.wait_for_everyone()
    gathered = full_adapter_state(accelerator, objective)
    if accelerator.is_main_process:
        graft_model.save_pretrained(output_dir / "adapter", overwrite=True, state_dict=gathered,
                                    training_summary=summary)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return TrainResult(model=graft_model, summary=summary, output_dir=output_dir)


def _resume_directory(recipe: Recipe) -> Path | None:
    choice = recipe.train.resume_from
    if choice is None:
        return None
    if choice == "latest":
        return latest_checkpoint(recipe.output_dir)
    path = Path(choice)
    if not path.is_dir():
        raise RecipeError(f"train.resume_from: no checkpoint directory at {path}")
    return path
