"""Training checkpoints: the adapter, the optimizer / scheduler / step state, and each process's RNG state.

Layout of ``output_dir/checkpoints/step-000010/``::

    adapter/                  a regular graftlm adapter (loadable with attach_adapter / graftlm eval)
    trainer_state.pt          {"step", "optimizer", "scheduler", "recipe"} (written by the main process)
    rng_state_<rank>.pt       torch (CPU and CUDA), python and numpy RNG states of that process
    checkpoint.json           written last: a checkpoint without it is incomplete and ignored
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graftlm.adapters import GraftModel
from graftlm.recipes.config import RecipeError

COMPLETE_MARKER = "checkpoint.json"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints``, if any."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    complete = [p for p in root.glob("step-*") if (p / COMPLETE_MARKER).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_adapter_state(accelerator, objective: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The `GraftModel`'s full state dict gathered from every process when the run shards its tensors (FSDP,
    DeepSpeed), keyed as ``GraftModel.state_dict()`` names them, for ``save_pretrained(state_dict=...)``;
    None when every process holds the whole adapter (one process, DDP: the live grafts are saved).

    A collective under FSDP: every process calls it (only the main process gets the tensors).
    ``objective`` is the prepared (wrapped) `TrainingObjective`, which holds the model as ``graft_model``.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    prefix = "graft_model."
    state = accelerator.get_state_dict(objective)
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def save_checkpoint(directory: Path, graft_model: GraftModel, optimizer, scheduler, step: int, recipe: dict,
                    accelerator, gathered: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint (every process calls this; the main process writes the shared files).
    ``gathered``: the `full_adapter_state` of a sharded run."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        graft_model.save_pretrained(directory / "adapter", overwrite=True, state_dict=gathered)
        torch.save(
            {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "recipe": recipe},
            directory / "trainer_state.pt",
        )
    accelerator.wait_for_everyone()
    torch.save(rng_state(), directory / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (directory / COMPLETE_MARKER).write_text(json.dumps({"step": step}) + "\n")


@dataclass
class TrainerState:
    step: int
    rng: dict[str, Any]


def load_checkpoint(directory: Path, graft_model: GraftModel, optimizer, scheduler, recipe: dict,
                    process_index: int) -> TrainerState:
    """Load adapter weights, optimizer and scheduler state in place; returns the step and this rank's RNG."""
    if not (directory / COMPLETE_MARKER).exists():
        raise RecipeError(f"train.resume_from: {directory} is not a complete checkpoint (no {COMPLETE_MARKER})")
    state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=False)
    _warn_on_recipe_change(state.get("recipe", {}), recipe, directory)
    try:
        graft_model.load_adapter_weights(directory / "adapter")
    except ValueError as err:
        raise RecipeError(f"train.resume_from: {err}") from err
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_path = directory / f"rng_state_{process_index}.pt"
    if not rng_path.exists():
        warnings.warn(f"{rng_path} missing (different number of processes?); using rank 0's RNG", stacklevel=2)
        rng_path = directory / "rng_state_0.pt"
    return TrainerState(step=int(state["step"]), rng=torch.load(rng_path, weights_only=False))


def _warn_on_recipe_change(saved: dict, current: dict, directory: Path) -> None:
    ignored = {"resume_from", "progress_bar"}
    changed = [
        f"{section}.{key}"
        for section in ("model", "data", "train")
        for key in set(saved.get(section, {})) | set(current.get(section, {}))
        if key not in ignored and saved.get(section, {}).get(key) != current.get(section, {}).get(key)
    ]
    if saved.get("graft") != current.get("graft"):
        changed.append("graft")
    if changed:
        warnings.warn(
            f"resuming from {directory} with a recipe that differs in {sorted(changed)}; the run will not "
            f"match an uninterrupted one",
            stacklevel=3,
        )
