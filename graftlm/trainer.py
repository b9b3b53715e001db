"""`transformers.Trainer` (and TRL's ``SFTTrainer``) for a `GraftModel`: `GraftTrainer`, `GraftSFTTrainer`.

A plain ``transformers.Trainer`` trains a `GraftModel` (its forward shows the base's signature, so the
dataset's columns are kept; only graft parameters have ``requires_grad``; gradient checkpointing goes
through `GraftModel.activation_checkpointing_enable`), but the Trainer saves adapters only for the classes
it knows (``PreTrainedModel``, peft's ``PeftModel``): for anything else it writes the whole state dict,
the frozen base included, as ``model.safetensors``, and it never calls a graft's own objective. The
`GraftTrainerMixin` on top of a Trainer class fixes both:

* ``save_model`` and every checkpoint write the adapter (`GraftModel.save_pretrained`: adapter files,
  the stacking order, a model card with the run's figures) and nothing of the base. FSDP is refused
  (`check_no_fsdp`): the Trainer saves FSDP runs through accelerate's sharded checkpoints, which would
  write no adapter; the recipes loop gathers and saves it;
* ``resume_from_checkpoint`` and ``load_best_model_at_end`` load adapter checkpoints back
  (`GraftModel.load_adapter_weights`);
* a graft's `Graft.training_loss` supplies the training loss when it has one (Echo's distillation,
  the Attractor's Jacobian term), weighted like the Trainer's own loss for gradient accumulation, and
  `Graft.on_train_step` runs before every optimizer step (schedules such as Echo's ramp).

``GraftTrainer`` is the mixin on ``transformers.Trainer``; ``GraftSFTTrainer`` (needs ``trl``) on TRL's
``SFTTrainer``, whose fused LM head it puts on the base model (the backbone it expects sits there).
Another Trainer subclass: ``class MyTrainer(GraftTrainerMixin, SomeTrainer): pass``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from graftlm.adapters import GraftModel
from graftlm.recipes.data import IGNORE_INDEX
from graftlm.recipes.objective import graft_training_terms

TRAINING_ARGS_NAME = "training_args.bin"  # what transformers.Trainer saves its arguments as


def label_token_count(inputs: dict[str, Any]) -> torch.Tensor:
    """The label tokens a causal-LM loss averages over in this micro-batch, as a device tensor (no host
    read): ``shift_labels`` when the collator supplies them (as the Trainer counts), else ``labels``
    shifted by one."""
    labels = inputs.get("shift_labels")
    labels = inputs["labels"][..., 1:] if labels is None else labels
    return labels.ne(IGNORE_INDEX).sum()


def check_no_fsdp(trainer: Trainer) -> None:
    """Refuse FSDP: the Trainer then saves the model through accelerate's FSDP checkpointing (with
    accelerate's default sharded state dict, ``save_model`` calls ``_save`` with nothing), which writes no
    adapter, or the whole base."""
    if getattr(trainer, "is_fsdp_enabled", False):
        raise NotImplementedError(
            f"{type(trainer).__name__} under FSDP is not supported: transformers.Trainer saves FSDP runs "
            f"through accelerate's FSDP checkpoints (sharded by default: no adapter would be written). Train "
            f"with the recipes loop (`accelerate launch -m graftlm train RECIPE.yaml`), which gathers the "
            f"adapter before every save, or with DDP"
        )


class GraftScheduleCallback(TrainerCallback):
    """Calls every graft's `Graft.on_train_step` (1-based step, total steps) before each optimizer step."""

    def __init__(self, graft_model: GraftModel):
        self.graft_model = graft_model

    def on_step_begin(self, args, state, control, **kwargs):
        for graft in self.graft_model.grafts.values():
            graft.on_train_step(state.global_step + 1, state.max_steps)


class GraftTrainerMixin:
    """Put before a ``transformers.Trainer`` class: it then trains and saves a `GraftModel` as graftlm does
    (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.graft_model, GraftModel):
            raise TypeError(f"{type(self).__name__} trains a GraftModel (graftlm.attach_adapter(...)), got "
                            f"{type(self.graft_model).__name__}")
        check_no_fsdp(self)
        self.add_callback(GraftScheduleCallback(self.graft_model))

    @property
    def graft_model(self) -> GraftModel:
        """The `GraftModel` being trained, unwrapped (``self.model`` is the FSDP wrapper under FSDP)."""
        return self.accelerator.unwrap_model(self.model)

    # -- the loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """A graft's own training loss when one has it (training only: evaluation scores the plain LM loss,
        comparable across grafts), else the Trainer's. ``model`` (the Trainer's, possibly a DDP wrapper)
        is what the graft's hook calls, so gradient synchronisation sees that forward."""
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        terms = graft_training_terms(self.graft_model, inputs, forward=model)
        if terms is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = terms["loss"]
        if num_items_in_batch is not None and (self.model_accepts_loss_kwargs or self.compute_loss_func):
            # The Trainer then expects a loss normalised over the whole accumulated batch (it skips its own
            # division by the accumulation steps): weight this batch's mean by its share of the label tokens.
            loss = loss * label_token_count(inputs) / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # num_items_in_batch counted every process
        return loss

    # -- saving ------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # The main process swaps the folder in atomically (GraftModel.save_pretrained); the others write
        # their RNG states into it next, so they wait for the swap.
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter (and the model card, the tokenizer, the training arguments), never the base.
        ``state_dict``: a full state dict when the Trainer passes one (DeepSpeed ZeRO-3)."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.graft_model.save_pretrained(output_dir, state_dict=state_dict, training_summary=self.training_summary(),
                                         load_from=self.args.hub_model_id if self.args.push_to_hub else None)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def training_summary(self) -> dict[str, Any]:
        """The figures the model card shows: steps, the last logged training and evaluation losses."""
        history = self.state.log_history

        def last(key: str) -> Any:
            return next((entry[key] for entry in reversed(history) if key in entry), None)

        return {"trainer": type(self).__name__, "steps": self.state.global_step, "final_loss": last("loss"),
                "final_eval_loss": last("eval_loss"), "train_runtime_s": last("train_runtime"),
                "num_processes": self.accelerator.num_processes}

    def create_model_card(self, *args, **kwargs) -> None:
        """Writes nothing: the graftlm model card is written with the adapter (`_save`); the Trainer's card
        would replace it."""

    # -- loading back ------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled:
            raise NotImplementedError("resuming a GraftTrainer run under FSDP is not supported: the adapter "
                                      "checkpoint holds full tensors; resume without FSDP")
        self.graft_model.load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class GraftTrainer(GraftTrainerMixin, Trainer):
    """``transformers.Trainer`` for a `GraftModel` (module docstring)."""


@functools.cache
def _sft_trainer_class() -> type:
    from trl import SFTTrainer
    from trl.trainer import sft_trainer

    class GraftSFTTrainer(GraftTrainerMixin, SFTTrainer):
        """TRL's ``SFTTrainer`` for a `GraftModel` (module docstring).

        ``SFTTrainer`` patches the model it trains with a fused LM head that runs the model's backbone
        (``model.base_model`` of a ``PreTrainedModel``) and projects with ``get_output_embeddings()``; on a
        `GraftModel`, ``base_model`` is the whole causal LM, so the head goes on that causal LM instead (as
        TRL does with the base of a peft model), with TRL's own arguments. The grafts' hooks all sit
        inside the causal LM and run in the fused forward too.
        """

        def __init__(self, *args, **kwargs):
            with _fused_head_on_the_base(sft_trainer):
                super().__init__(*args, **kwargs)

    return GraftSFTTrainer


@contextlib.contextmanager
def _fused_head_on_the_base(module):
    original = module.add_fused_lm_head

    def add_fused_lm_head(model, *args, **kwargs):
        return original(model.base_model if isinstance(model, GraftModel) else model, *args, **kwargs)

    module.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        module.add_fused_lm_head = original


def __getattr__(name: str) -> Any:
    if name == "GraftSFTTrainer":  # built on first use: trl is optional
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
