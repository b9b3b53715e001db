"""`GraftModel` (a frozen base model with grafts attached) and `attach_adapter`, the public entry point."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters import io
from graftlm.adapters.config import GraftConfig
from graftlm.adapters.graft import Graft
from graftlm.adapters.registry import get_graft_type, graft_type_for_config
from graftlm.patches import get_patch

DEFAULT_ADAPTER_NAME = "default"


class GraftModel(nn.Module):
    """A frozen ``*ForCausalLM`` with one or more grafts attached, each under its own name.

    Like peft's ``PeftModel``: ``forward`` and ``generate`` are the base model's (with the grafts active),
    unknown attributes are looked up on the base model, and only graft tensors are saved.
    """

    def __init__(self, base_model: nn.Module):
        super().__init__()
        self.patch = get_patch(base_model)
        self.base_model = base_model
        self.grafts = nn.ModuleDict()
        self._base_requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)

    # -- delegation ----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "grafts", "patch"}:
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The base model's ``generate``; each active graft may first adjust the kwargs (its cache)."""
        for graft in self.grafts.values():
            if graft.active:
                kwargs = graft.prepare_generate_kwargs(kwargs)
        return self.base_model.generate(*args, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the frozen base's layers; non-reentrant by default so grafts inside still get grads.

        Graft hooks on checkpointed layers run again during recompute, with the same inputs.
        """
        merged = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=merged, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable  # the name peft / Trainer users know

    # -- grafts --------------------------------------------------------------------------------
    @property
    def base_description(self) -> dict[str, Any]:
        describe = self.patch.describe(self.base_model)
        return io.base_model_record(self.base_model, describe)

    def add_graft(self, config: GraftConfig, adapter_name: str = DEFAULT_ADAPTER_NAME) -> Graft:
        """Build and install a new graft from ``config`` under ``adapter_name``."""
        graft_type = graft_type_for_config(config)
        if adapter_name in self.grafts:
            raise ValueError(f"an adapter named {adapter_name!r} is already attached; pick another adapter_name")
        for name, existing in self.grafts.items():
            if existing.config.graft_type == config.graft_type:
                raise ValueError(
                    f"a {config.graft_type!r} graft is already attached as {name!r}; stacking two grafts of "
                    f"the same kind is not supported"
                )
        graft = graft_type.graft_class(config, self.base_model, self.patch)
        reference = next(self.base_model.parameters())
        graft.to(device=reference.device)
        graft.install()
        self.grafts[adapter_name] = graft
        for parameter in graft.all_parameters():
            parameter.requires_grad_(not config.inference_mode)
        return graft

    def graft_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters: every graft's own, and those it placed in the base (peft LoRA)."""
        for graft in self.grafts.values():
            for parameter in graft.all_parameters():
                if parameter.requires_grad:
                    yield parameter

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; the total is the base plus every graft."""
        trainable = sum(p.numel() for p in self.graft_parameters())
        total = sum(p.numel() for p in self.base_model.parameters())
        total += sum(p.numel() for g in self.grafts.values() for p in g.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (every graft acts as the identity)."""
        previous = {name: graft.active for name, graft in self.grafts.items()}
        try:
            for graft in self.grafts.values():
                graft.active = False
            yield
        finally:
            for name, graft in self.grafts.items():
                graft.active = previous[name]

    def detach(self) -> nn.Module:
        """Remove every graft (hooks, modules, attention registrations) and return the plain base model."""
        for graft in reversed(list(self.grafts.values())):
            graft.remove()
        self.grafts = nn.ModuleDict()
        for name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self._base_requires_grad.get(name, False))
        return self.base_model

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | Path, adapter_names: list[str] | None = None, overwrite: bool = False
    ) -> Path:
        """Write each adapter: ``default`` at the root, others in a sub-folder named after them."""
        save_directory = Path(save_directory)
        names = adapter_names or list(self.grafts)
        base = self.base_description
        for name in names:
            graft = self.grafts[name]
            target = save_directory if name == DEFAULT_ADAPTER_NAME else save_directory / name
            io.write_adapter(
                target, graft.config.graft_type, graft.config.to_dict(), base, graft.adapter_state_dict(), overwrite
            )
        return save_directory

    def load_adapter(
        self, path_or_repo_id: str | Path, adapter_name: str = DEFAULT_ADAPTER_NAME, is_trainable: bool = False,
        revision: str | None = None, token: str | None = None,
    ) -> Graft:
        """Attach a saved adapter (local directory or Hub repo id) under ``adapter_name``.

        Sub-folders holding further adapters (a stacked save) are attached under their folder names.
        """
        directory = io.resolve_adapter_dir(str(path_or_repo_id), revision=revision, token=token)
        graft = self._load_one(directory, adapter_name, is_trainable)
        for sub in io.adapter_subdirectories(directory):
            self._load_one(sub, sub.name, is_trainable)
        return graft

    def _load_one(self, directory: Path, adapter_name: str, is_trainable: bool) -> Graft:
        record, tensors = io.read_adapter(directory)
        io.check_base_model(record["base_model"], self.base_description, str(directory))
        config = get_graft_type(record["graft_type"]).config_class.from_dict(record["config"])
        config.inference_mode = not is_trainable
        graft = self.add_graft(config, adapter_name)
        try:
            expected = graft.adapter_state_dict()
            io.check_tensors(tensors, expected, str(directory))
            reference = {k: v for k, v in expected.items()}
            graft.load_adapter_state_dict(
                {k: v.to(device=reference[k].device, dtype=reference[k].dtype) for k, v in tensors.items()}
            )
        except Exception:
            graft.remove()
            del self.grafts[adapter_name]
            raise
        return graft

    def push_to_hub(
        self, repo_id: str, private: bool | None = None, token: str | None = None,
        commit_message: str = "Upload graftlm adapter", revision: str | None = None,
    ) -> str:
        """Upload the adapter files (nothing of the base model) to a Hub model repo; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as staging:
            self.save_pretrained(staging)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=staging, commit_message=commit_message, revision=revision
            )
        return str(commit)


def attach_adapter(
    model: nn.Module,
    config_or_path: GraftConfig | str | Path,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    is_trainable: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> GraftModel:
    """Attach a graft to ``model`` and return the `GraftModel`.

    ``config_or_path``: a config dataclass (a new, trainable adapter), a local directory, or a Hub repo id
    of a saved adapter (frozen unless ``is_trainable=True``, as in peft). Calling it on a `GraftModel`
    stacks another graft of a different kind under another ``adapter_name``.
    """
    graft_model = model if isinstance(model, GraftModel) else GraftModel(model)
    if isinstance(config_or_path, GraftConfig):
        if is_trainable is False:
            config_or_path.inference_mode = True
        graft_model.add_graft(config_or_path, adapter_name)
    elif isinstance(config_or_path, (str, Path)):
        graft_model.load_adapter(config_or_path, adapter_name, bool(is_trainable), revision=revision, token=token)
    else:
        raise TypeError(f"config_or_path must be a GraftConfig or a path / Hub id, not {type(config_or_path).__name__}")
    return graft_model


def trainable_state_dict(model: GraftModel) -> dict[str, torch.Tensor]:
    """Every adapter's tensors keyed ``<adapter_name>.<tensor>`` (for checkpoints and rank comparisons)."""
    return {f"{name}.{k}": v for name, graft in model.grafts.items() for k, v in graft.adapter_state_dict().items()}
