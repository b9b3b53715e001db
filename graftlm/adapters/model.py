"""`GraftModel` (a frozen base model with grafts attached) and `attach_adapter`, the public entry point."""

from __future__ import annotations

import contextlib
import inspect
import tempfile
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.adapters import io
from graftlm.adapters.config import GraftConfig, GraftConfigError
from graftlm.adapters.graft import Graft
from graftlm.adapters.graft_cache import GraftCache
from graftlm.adapters.io import check_adapter_name
from graftlm.adapters.model_card import is_graftlm_card, render_model_card
from graftlm.adapters.registry import UnknownGraftTypeError, get_graft_type, graft_type_for_config
from graftlm.dtype_policy import parameter_dtype
from graftlm.patches import get_patch
from graftlm.patches.cache_kwarg import cache_from_kwargs, with_cache

DEFAULT_ADAPTER_NAME = io.DEFAULT_ADAPTER_NAME
OWNER_ATTRIBUTE = "_graftlm_graft_model"  # in the base model's __dict__: the GraftModel wrapping it


class BaseAlreadyGraftedError(RuntimeError):
    """The base model is already wrapped by a `GraftModel` (it carries graftlm grafts)."""


# generate() kwargs / GenerationConfig fields that turn on a mode which crops the cache (assisted decoding)
ASSISTED_GENERATION_KEYS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


class UnsupportedGenerationError(ValueError):
    """A generation mode that an active graft cannot run correctly (e.g. beam search)."""


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
        self.forward = _forward_with_the_signature_of(self, base_model)
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

    def forward(self, *args, labels=None, **kwargs):
        """The base model's forward, with the grafts active. Bound per instance (`__init__`) so that
        ``inspect.signature(graft_model.forward)`` is the base's: `transformers.Trainer` keeps the dataset
        columns that the forward's signature names, and would drop them all for ``(*args, **kwargs)``.
        ``labels`` is named here because the Trainer finds its label columns on the class's signature."""
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The base model's ``generate`` on one `GraftCache` that holds every active graft's state
        (`make_cache`; a caller's own cache is used as given), after each active graft may adjust the kwargs.

        Beam search (``num_beams > 1``, from the kwargs or the generation config) is refused while a graft
        that can't reorder its state with the beams (``Graft.supports_beam_search = False``) is active, and
        assisted generation (``assistant_model``, ``prompt_lookup_num_tokens``), which crops the cache, while
        one that can't crop its state (``Graft.supports_crop = False``) is; both are refused with a caller's
        cache that is not a `GraftCache` (its reorder and crop don't reach the grafts' states).
        """
        self._check_generation_mode(kwargs)
        if cache_from_kwargs(kwargs) is None and kwargs.get("use_cache") is not False:
            kwargs = {**with_cache(kwargs, self.make_cache()), "use_cache": True}
        for graft in self.grafts.values():
            if graft.active:
                kwargs = graft.prepare_generate_kwargs(kwargs)
        return self.base_model.generate(*args, **kwargs)

    def make_cache(self) -> GraftCache:
        """An empty `GraftCache` for the grafts active now: each one's state, and its key/value layers in place
        of the base's (Echo's window layers). Pass it as the cache to call the model by hand."""
        states, layers = {}, {}
        for graft in self.grafts.values():
            if not graft.active:
                continue
            state = graft.make_cache_state()
            if state is not None:
                states[graft.state_key] = state
            layers.update(graft.cache_layers())
        return GraftCache(self.base_model.config, states, layers)

    def _check_generation_mode(self, kwargs: dict[str, Any]) -> None:
        active = {name: graft for name, graft in self.grafts.items() if graft.active}
        describe = lambda names: ", ".join(f"{name!r} ({self.grafts[name].config.graft_type})" for name in names)
        generation_config = kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        num_beams = kwargs.get("num_beams") or getattr(generation_config, "num_beams", None) or 1
        assisted = [key for key in ASSISTED_GENERATION_KEYS
                    if kwargs.get(key) is not None or getattr(generation_config, key, None) is not None]
        cache = cache_from_kwargs(kwargs)
        foreign = cache is not None and not isinstance(cache, GraftCache) and any(
            graft.make_cache_state() is not None for graft in active.values())
        if num_beams > 1:
            refusing = [name for name, graft in active.items() if not graft.supports_beam_search]
            if refusing:
                raise UnsupportedGenerationError(
                    f"beam search (num_beams={num_beams}) is not supported with the graft {describe(refusing)}: its "
                    f"state on the generation cache is not reordered with the beams, so beams would be scored "
                    f"wrongly. Use num_beams=1 (greedy or sampling), or run the base alone inside "
                    f"GraftModel.disable_adapter()")
            if foreign:
                raise UnsupportedGenerationError(
                    f"beam search (num_beams={num_beams}) with a {type(cache).__name__} as the cache: its reorder "
                    f"does not reach the grafts' states. Pass no cache (generate builds a GraftCache) or "
                    f"graft_model.make_cache()")
        if assisted:
            refusing = [name for name, graft in active.items() if not graft.supports_crop]
            if refusing:
                raise UnsupportedGenerationError(
                    f"assisted generation ({', '.join(assisted)}) is not supported with the graft "
                    f"{describe(refusing)}: it crops the generation cache back to the accepted tokens, and that "
                    f"graft's state on the cache cannot be cropped, so later tokens would see rejected drafts. "
                    f"Generate without it, or run the base alone inside GraftModel.disable_adapter()")
            if foreign:
                raise UnsupportedGenerationError(
                    f"assisted generation ({', '.join(assisted)}) with a {type(cache).__name__} as the cache: its "
                    f"crop does not reach the grafts' states. Pass no cache (generate builds a GraftCache) or "
                    f"graft_model.make_cache()")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the frozen base's layers; non-reentrant by default so grafts inside still get grads.

        Graft hooks on checkpointed layers run again during recompute, with the same inputs.
        """
        merged = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=merged, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The older name (peft, TRL and transformers < 5 call it): `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

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
        self._check_cache_conflicts(graft, adapter_name)
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

    def _check_cache_conflicts(self, graft: Graft, adapter_name: str) -> None:
        """Refuse a graft whose generation cache layers clash with an attached graft's: two grafts replacing one
        layer's key/value cache, or one reading the whole key cache of a layer another replaces."""
        new = f"{adapter_name!r} ({graft.config.graft_type})"
        for name, existing in self.grafts.items():
            old = f"{name!r} ({existing.config.graft_type})"
            reads = "reads the whole key cache that"
            clashes = [
                (graft.cache_layers_replaced() & existing.cache_layers_replaced(), "both replace the key/value cache"),
                (graft.full_key_layers() & existing.cache_layers_replaced(), f"{new} {reads} {old} replaces"),
                (existing.full_key_layers() & graft.cache_layers_replaced(), f"{old} {reads} {new} replaces"),
            ]
            for layers, what in clashes:
                if layers:
                    raise ValueError(f"cannot attach {new} beside {old}: on layers {sorted(layers)} {what} (one "
                                     f"generation cache serves both); give them disjoint target_layers")

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
        self, save_directory: str | Path, adapter_names: list[str] | None = None, overwrite: bool = False, *,
        state_dict: dict[str, torch.Tensor] | None = None, training_summary: dict[str, Any] | None = None,
        is_main_process: bool = True, safe_serialization: bool = True, load_from: str | None = None,
    ) -> Path:
        """Write the adapters (all, or ``adapter_names``) and a model card, as one atomic replacement of the
        folder's adapter files (`io.write_adapters`): ``default`` at the root, others in a sub-folder named
        after them, the stacking order (attach order, whatever order ``adapter_names`` gives) in
        ``graftlm_stack.json``.

        ``state_dict``: a full state dict of this `GraftModel` (its own key names) to take the graft tensors
        from instead of the live grafts: what ``accelerator.get_state_dict(model)`` gathers under FSDP, where
        each process holds only a shard. ``training_summary``: figures for the card's training section
        (the recipes loop passes its ``train_summary.json``). ``is_main_process=False`` writes nothing (the
        other processes of a multi-process run). ``load_from``: what the card tells `attach_adapter` to load
        (a Hub id; default ``"path/to/<folder name>"``: a card holds no local paths). Without ``overwrite``, replacing an adapter of another graft type or
        base, or dropping an adapter saved there earlier that this save does not include, raises
        `FileExistsError`; a README.md that is not a graftlm card is kept (`io.ModelCardWarning`).
        """
        if not safe_serialization:
            raise ValueError("graftlm adapters are always saved as safetensors (safe_serialization=False is not "
                             "supported)")
        wanted = list(self.grafts) if adapter_names is None else list(adapter_names)
        unknown = [name for name in wanted if name not in self.grafts]
        if unknown or not wanted:
            raise ValueError(f"cannot save adapters {unknown or wanted}: attached adapters are {list(self.grafts)}")
        if not is_main_process:
            return Path(save_directory)
        names = [name for name in self.grafts if name in wanted]
        base = self.base_description
        adapters = {}
        for name in names:
            graft = self.grafts[name]
            graft.config.check()
            adapters[name] = io.AdapterRecord(graft.config.graft_type, graft.config.to_dict(), base,
                                              self._adapter_tensors(name, state_dict))
        card = render_model_card([(name, self.grafts[name].config) for name in names], base,
                                 load_from or f"path/to/{Path(save_directory).name}", training_summary)
        io.write_adapters(save_directory, adapters, overwrite, card=card)
        return Path(save_directory)

    def _adapter_tensors(self, name: str, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors: the live graft's, or picked out of a full ``state_dict`` of this model."""
        graft = self.grafts[name]
        if state_dict is None:
            tensors = graft.adapter_state_dict()
            sharded = [key for key, value in tensors.items() if _is_sharded(value)]
            if sharded:
                raise ValueError(
                    f"adapter {name!r}: the tensors {sharded[:3]}{' ...' if len(sharded) > 3 else ''} are shards "
                    f"(FSDP): this process holds only part of them. Gather them on every process first "
                    f"(state_dict = accelerator.get_state_dict(model)) and pass save_pretrained(..., "
                    f"state_dict=state_dict) on the main process")
            return tensors
        paths = {key: _without_wrapper_prefixes(path)
                 for key, path in graft.adapter_state_paths(f"grafts.{name}.", "base_model.").items()}
        missing = sorted(path for path in paths.values() if path not in state_dict)
        if missing:
            raise ValueError(f"state_dict holds no tensors {missing[:3]}{' ...' if len(missing) > 3 else ''} of "
                             f"adapter {name!r}; pass a full state dict of this GraftModel (its own key names, "
                             f"e.g. accelerator.get_state_dict(graft_model))")
        return {key: state_dict[path] for key, path in paths.items()}

    def load_adapter(
        self, path_or_repo_id: str | Path, adapter_name: str = DEFAULT_ADAPTER_NAME, is_trainable: bool = False,
        revision: str | None = None, token: str | None = None,
    ) -> Graft:
        """Attach a saved adapter (local directory or Hub repo id) under ``adapter_name``.

        A stacked save attaches all its adapters in the order they were attached when saved
        (`io.saved_adapters`): the one at the root under ``adapter_name``, the others under their folder
        names (so another ``adapter_name`` is refused for a save with no root adapter). Every file, config, name and base check runs before anything is installed; if a tensor check
        then fails, every graft this call installed is removed again. Returns the first graft attached.
        """
        check_adapter_name(adapter_name)
        directory = io.resolve_adapter_dir(str(path_or_repo_id), revision=revision, token=token)
        planned = [(folder, adapter_name if folder == directory
                    else check_adapter_name(name, f"sub-adapter folder {folder}:"))
                   for name, folder in io.saved_adapters(directory)]
        if not planned:
            raise FileNotFoundError(f"{directory} holds no {io.CONFIG_NAME}: not a graftlm adapter directory")
        if adapter_name != DEFAULT_ADAPTER_NAME and all(folder != directory for folder, _ in planned):
            raise ValueError(f"cannot load {directory} as {adapter_name!r}: it holds no adapter at its root, only "
                             f"the stack {[name for _, name in planned]}, which loads under those names (leave "
                             f"adapter_name out)")
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

    def load_adapter_weights(self, path: str | Path) -> None:
        """Load the tensors of a saved copy of this stack into the attached grafts, in place (resuming a run).

        The folder must hold the same adapters (names and graft types) as are attached; every adapter's
        tensors are checked (`io.tensors_for_graft`) before any is loaded.
        """
        directory = Path(path)
        saved = dict(io.saved_adapters(directory)) if directory.is_dir() else {}
        if sorted(saved) != sorted(self.grafts):
            raise ValueError(f"{directory} holds the adapters {sorted(saved)}, this model has {sorted(self.grafts)} "
                             f"attached; cannot load its weights in place")
        loaded = {}
        for name, graft in self.grafts.items():
            record, tensors = io.read_adapter(saved[name])
            if record["graft_type"] != graft.config.graft_type:
                raise ValueError(f"{saved[name]} holds a {record['graft_type']!r} adapter, the attached {name!r} is "
                                 f"a {graft.config.graft_type!r} graft")
            weights = str(saved[name] / io.WEIGHTS_NAME)
            loaded[name] = io.tensors_for_graft(tensors, graft.adapter_state_dict(), weights)
        for name, tensors in loaded.items():
            self.grafts[name].load_adapter_state_dict(tensors)

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
        training_summary: dict[str, Any] | None = None,
    ) -> str:
        """Upload the adapter files and the model card (nothing of the base model) to a Hub model repo;
        returns the commit URL. A README.md already in the repo that is not a graftlm card is left as it is
        (`io.ModelCardWarning`)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        keep_remote_readme = _has_own_readme(api, repo_id, revision)
        with tempfile.TemporaryDirectory() as staging:
            folder = Path(staging) / "adapter"
            if keep_remote_readme:
                warnings.warn(f"{repo_id} has a README.md that is not a graftlm model card; uploading the adapter "
                              f"without a card", io.ModelCardWarning, stacklevel=2)
            self.save_pretrained(folder, training_summary=training_summary, load_from=repo_id)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision,
                ignore_patterns=[io.CARD_NAME] if keep_remote_readme else None,
            )
        return str(commit)


def _has_own_readme(api: Any, repo_id: str, revision: str | None) -> bool:
    """Whether the Hub repo has a README.md that is not a graftlm card (the user's, to be kept)."""
    if not api.file_exists(repo_id, io.CARD_NAME, revision=revision):
        return False
    path = api.hf_hub_download(repo_id, io.CARD_NAME, revision=revision)
    return not is_graftlm_card(Path(path).read_text(errors="replace"))


def _is_sharded(tensor: torch.Tensor) -> bool:
    """A tensor that is one process's shard of a parameter (an FSDP2 ``DTensor`` not replicated)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor, Replicate

    return isinstance(tensor, DTensor) and not all(isinstance(p, Replicate) for p in tensor.placements)


#: Module names that FSDP (v1) and activation-checkpoint wrappers insert into parameter names; a gathered
#: full state dict has them stripped.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _without_wrapper_prefixes(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _forward_with_the_signature_of(graft_model: GraftModel, base_model: nn.Module) -> types.MethodType:
    """`GraftModel.forward` bound to ``graft_model``, with the signature of ``base_model.forward``.

    A bound method (not a partial), so that accelerate's autocast wrapping and unwrapping of ``forward``
    (which go through ``forward.__func__``) keep working.
    """

    def forward(self, *args, **kwargs):
        return GraftModel.forward(self, *args, **kwargs)

    base = inspect.signature(base_model.forward)
    itself = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = base.replace(parameters=[itself, *base.parameters.values()])
    forward.__doc__ = GraftModel.forward.__doc__
    return types.MethodType(forward, graft_model)


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
