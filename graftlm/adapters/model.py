"""`GraftModel` (a frozen base model with grafts attached) and `attach_adapter`, the public entry point."""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters import io
from graftlm.adapters.config import GraftConfig, GraftConfigError
from graftlm.adapters.graft import Graft
from graftlm.adapters.registry import UnknownGraftTypeError, get_graft_type, graft_type_for_config
from graftlm.dtype_policy import parameter_dtype
from graftlm.patches import get_patch

DEFAULT_ADAPTER_NAME = "default"
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
OWNER_ATTRIBUTE = "_graftlm_graft_model"  # in the base model's __dict__: the GraftModel wrapping it


class BaseAlreadyGraftedError(RuntimeError):
    """The base model is already wrapped by a `GraftModel` (it carries graftlm grafts)."""


class UnsupportedGenerationError(ValueError):
    """A generation mode that an active graft cannot run correctly (e.g. beam search)."""


def check_adapter_name(name: object, where: str = "adapter_name") -> str:
    """``name`` if it is a safe adapter name (it keys ``GraftModel.grafts`` and names a sub-folder of a save)."""
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{where} {name!r} is not a valid adapter name: use 1 to 64 letters, digits, '_' or '-', not starting "
            f"with '-' (no dots, slashes or spaces: it keys GraftModel.grafts and names a sub-folder when saved)"
        )
    return name


class GraftModel(nn.Module):
    """A frozen ``*ForCausalLM`` with one or more grafts attached, each under its own name.

    Like peft's ``PeftModel``: ``forward`` and ``generate`` are the base model's (with the grafts active),
    unknown attributes are looked up on the base model, and only graft tensors are saved.
    """

    def __init__(self, base_model: nn.Module):
        super().__init__()
        if isinstance(base_model, GraftModel):
            raise TypeError("base_model is already a GraftModel; attach_adapter(graft_model, ...) stacks on it")
        owner = base_model.__dict__.get(OWNER_ATTRIBUTE)
        if owner is not None:
            attached = ", ".join(f"{n!r} ({g.config.graft_type})" for n, g in owner.grafts.items()) or "none yet"
            raise BaseAlreadyGraftedError(
                f"this {type(base_model).__name__} is already wrapped by a GraftModel (grafts attached: {attached}); "
                f"a second one would stack on it silently. Stack on that GraftModel instead "
                f"(attach_adapter(graft_model, config, adapter_name=...)) or call graft_model.detach() first"
            )
        self.patch = get_patch(base_model)
        self.base_model = base_model
        self.grafts = nn.ModuleDict()
        self._detached = False
        self._base_requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        base_model.__dict__[OWNER_ATTRIBUTE] = self  # a plain attribute: not a submodule of the base

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
        """The base model's ``generate``; each active graft may first adjust the kwargs (its cache).

        Beam search (``num_beams > 1``, from the kwargs or the generation config) is refused while a graft
        that can't reorder its state with the beams (``Graft.supports_beam_search = False``) is active.
        """
        self._check_generation_mode(kwargs)
        for graft in self.grafts.values():
            if graft.active:
                kwargs = graft.prepare_generate_kwargs(kwargs)
        return self.base_model.generate(*args, **kwargs)

    def _check_generation_mode(self, kwargs: dict[str, Any]) -> None:
        generation_config = kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        num_beams = kwargs.get("num_beams") or getattr(generation_config, "num_beams", None) or 1
        if num_beams <= 1:
            return
        refusing = [f"{name!r} ({graft.config.graft_type})" for name, graft in self.grafts.items()
                    if graft.active and not graft.supports_beam_search]
        if refusing:
            raise UnsupportedGenerationError(
                f"beam search (num_beams={num_beams}) is not supported with the graft {', '.join(refusing)}: its "
                f"state on the generation cache is not reordered with the beams, so beams would be scored wrongly. "
                f"Use num_beams=1 (greedy or sampling), or run the base alone inside GraftModel.disable_adapter()"
            )

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
        """Build and install a new graft from ``config`` under ``adapter_name``.

        The name and the config (again, in case it changed since it was built, and against this base) are
        checked before anything is installed; a graft whose install fails is removed again.
        """
        if self._detached:
            raise RuntimeError("this GraftModel was detached from its base; attach_adapter(base_model, ...) "
                               "makes a new one")
        check_adapter_name(adapter_name)
        graft_type = graft_type_for_config(config)
        if adapter_name in self.grafts:
            raise ValueError(f"an adapter named {adapter_name!r} is already attached; pick another adapter_name")
        for name, existing in self.grafts.items():
            if existing.config.graft_type == config.graft_type:
                raise ValueError(
                    f"a {config.graft_type!r} graft is already attached as {name!r}; stacking two grafts of "
                    f"the same kind is not supported"
                )
        config.check()
        config.validate_for_model(self.base_model.config)
        graft = graft_type.graft_class(config, self.base_model, self.patch)
        reference = next(self.base_model.parameters())
        graft.to(device=reference.device, dtype=parameter_dtype(reference.dtype))  # float32 on a bf16 base
        try:
            graft.install()
        except BaseException:
            graft.remove()
            raise
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
        if self.base_model.__dict__.get(OWNER_ATTRIBUTE) is self:
            del self.base_model.__dict__[OWNER_ATTRIBUTE]
        self._detached = True
        return self.base_model

    def _remove_graft(self, adapter_name: str) -> None:
        graft = self.grafts[adapter_name]
        graft.remove()
        del self.grafts[adapter_name]

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | Path, adapter_names: list[str] | None = None, overwrite: bool = False
    ) -> Path:
        """Write the adapters (all, or ``adapter_names``): ``default`` at the root, others in a sub-folder
        named after them, as one atomic replacement of the folder's adapter files (`io.write_adapters`).

        Without ``overwrite``, replacing an adapter of another graft type or base, or dropping an adapter
        saved there earlier that this save does not include, raises `FileExistsError`.
        """
        names = list(self.grafts) if adapter_names is None else list(adapter_names)
        unknown = [name for name in names if name not in self.grafts]
        if unknown or not names:
            raise ValueError(f"cannot save adapters {unknown or names}: attached adapters are {list(self.grafts)}")
        base = self.base_description
        adapters = {}
        for name in names:
            graft = self.grafts[name]
            graft.config.check()
            adapters["" if name == DEFAULT_ADAPTER_NAME else name] = io.AdapterRecord(
                graft.config.graft_type, graft.config.to_dict(), base, graft.adapter_state_dict()
            )
        io.write_adapters(save_directory, adapters, overwrite)
        return Path(save_directory)

    def load_adapter(
        self, path_or_repo_id: str | Path, adapter_name: str = DEFAULT_ADAPTER_NAME, is_trainable: bool = False,
        revision: str | None = None, token: str | None = None,
    ) -> Graft:
        """Attach a saved adapter (local directory or Hub repo id) under ``adapter_name``.

        Sub-folders holding further adapters (a stacked save) are attached under their folder names. Every
        file, config, name and base check runs before anything is installed; if a tensor check then fails,
        every graft this call installed is removed again.
        """
        check_adapter_name(adapter_name)
        directory = io.resolve_adapter_dir(str(path_or_repo_id), revision=revision, token=token)
        planned = [(directory, adapter_name)] if (directory / io.CONFIG_NAME).exists() else []
        planned += [(sub, check_adapter_name(sub.name, f"sub-adapter folder {sub}:"))
                    for sub in io.adapter_subdirectories(directory)]
        if not planned:
            raise FileNotFoundError(f"{directory} holds no {io.CONFIG_NAME}: not a graftlm adapter directory")
        names = [name for _, name in planned]
        taken = sorted({name for name in names if name in self.grafts or names.count(name) > 1})
        if taken:
            raise ValueError(f"cannot load {directory}: adapter names {taken} are already attached or used twice; "
                             f"pick another adapter_name")
        checked = [self._read_checked(folder, is_trainable) for folder, _ in planned]
        installed: list[str] = []
        try:
            for (folder, name), (config, tensors) in zip(planned, checked):
                graft = self.add_graft(config, name)
                installed.append(name)
                weights = str(folder / io.WEIGHTS_NAME)
                graft.load_adapter_state_dict(io.tensors_for_graft(tensors, graft.adapter_state_dict(), weights))
        except BaseException:
            for name in reversed(installed):
                self._remove_graft(name)
            raise
        return self.grafts[names[0]]

    def _read_checked(self, directory: Path, is_trainable: bool) -> tuple[GraftConfig, dict[str, torch.Tensor]]:
        """One saved adapter's config, checked against its class and this base, and its tensors (unchecked)."""
        record, tensors = io.read_adapter(directory)
        config_path = directory / io.CONFIG_NAME
        io.check_base_model(record["base_model"], self.base_description, str(directory))
        try:
            config_class = get_graft_type(record["graft_type"]).config_class
        except UnknownGraftTypeError as err:
            raise UnknownGraftTypeError(f"{config_path}: {err}") from None
        try:
            config = config_class.from_dict(record["config"])
            config.inference_mode = not is_trainable
            config.validate_for_model(self.base_model.config)
        except GraftConfigError as err:
            raise io.AdapterConfigError(f"{config_path}: {err}") from None
        return config, tensors

    def push_to_hub(
        self, repo_id: str, private: bool | None = None, token: str | None = None,
        commit_message: str = "Upload graftlm adapter", revision: str | None = None,
    ) -> str:
        """Upload the adapter files (nothing of the base model) to a Hub model repo; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as staging:
            folder = self.save_pretrained(Path(staging) / "adapter")
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
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
    stacks another graft of a different kind under another ``adapter_name``; calling it again on a raw model
    that a `GraftModel` already wraps raises `BaseAlreadyGraftedError`. A refused attach or load leaves
    the model as it was (no hooks, ``requires_grad`` restored).
    """
    if not isinstance(config_or_path, (GraftConfig, str, Path)):
        raise TypeError(f"config_or_path must be a GraftConfig or a path / Hub id, not {type(config_or_path).__name__}")
    wrapped_here = not isinstance(model, GraftModel)
    graft_model = GraftModel(model) if wrapped_here else model
    try:
        if isinstance(config_or_path, GraftConfig):
            if is_trainable is False:
                config_or_path.inference_mode = True
            graft_model.add_graft(config_or_path, adapter_name)
        else:
            graft_model.load_adapter(config_or_path, adapter_name, bool(is_trainable), revision=revision, token=token)
    except BaseException:
        if wrapped_here:
            graft_model.detach()  # a refused attach leaves the raw model exactly as it was
        raise
    return graft_model


def trainable_state_dict(model: GraftModel) -> dict[str, torch.Tensor]:
    """Every adapter's tensors keyed ``<adapter_name>.<tensor>`` (for checkpoints and rank comparisons)."""
    return {f"{name}.{k}": v for name, graft in model.grafts.items() for k, v in graft.adapter_state_dict().items()}
