"""Adapter files on disk and on the Hub: ``adapter_config.json`` + ``adapter_model.safetensors``.

``adapter_config.json``::

    {"graft_type": "sst", "graftlm_version": "0.1.0", "config": {...the graft's dataclass...},
     "base_model": {"name_or_path": ..., "revision": ..., "architecture": ..., "model_type": ...,
                    "hidden_size": ..., "num_hidden_layers": ...}}

``adapter_model.safetensors`` holds only the graft's tensors. A stacked save puts the adapter named
``default`` at the root and every other one in a sub-folder named after it. Every save records which
adapters it holds, in their stacking order (hooks on one module run in attach order, so the order is
part of the model), in ``graftlm_stack.json``::

    {"graftlm_version": "0.1.0", "adapters": [{"name": "echo", "graft_type": "echo"},
                                              {"name": "default", "graft_type": "sst"}]}

Only the adapters listed there belong to the save: other sub-folders holding adapters (a Trainer's
``checkpoint-N`` folders inside its output folder) are left alone by saves and loads.

A save also writes the model card ``README.md`` (`graftlm.adapters.model_card`) unless the folder holds a
README.md of the user's. Saving is atomic (`write_adapters`); reading refuses, naming the file, anything
it cannot use (`read_adapter`, `tensors_for_graft`, `saved_adapters`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from graftlm import __version__
from graftlm.adapters.model_card import is_graftlm_card

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
STACK_NAME = "graftlm_stack.json"
CARD_NAME = "README.md"
DEFAULT_ADAPTER_NAME = "default"  # the adapter saved at the root of a folder; the others go in sub-folders
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


class AdapterBaseMismatchError(ValueError):
    """The adapter was trained on a base model of a different shape or architecture."""


class AdapterConfigError(ValueError):
    """An ``adapter_config.json`` that cannot be used: not JSON, missing entries, or a graft config whose
    fields fail their checks (the message names the file and the field)."""


class AdapterTensorsError(ValueError):
    """The saved tensors can't be loaded: unreadable file, missing, unexpected or misshapen tensors, a
    non-float dtype, or non-finite values."""


class AdapterDtypeWarning(UserWarning):
    """Saved tensors of another float dtype were cast to the graft's dtype with a loss of precision."""


class NewerVersionWarning(UserWarning):
    """The adapter was saved by a newer graftlm than the one loading it."""


class ModelCardWarning(UserWarning):
    """The folder holds a README.md that is not a graftlm model card: it was kept and no card written."""


def check_adapter_name(name: object, where: str = "adapter_name") -> str:
    """``name`` if it is a safe adapter name (it keys ``GraftModel.grafts`` and names a sub-folder of a save)."""
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{where} {name!r} is not a valid adapter name: use 1 to 64 letters, digits, '_' or '-', not starting "
            f"with '-' (no dots, slashes or spaces: it keys GraftModel.grafts and names a sub-folder when saved)"
        )
    return name


def adapter_folder(name: str) -> str:
    """The sub-folder an adapter is saved in: ``""`` (the root) for ``default``, else its name."""
    return "" if name == DEFAULT_ADAPTER_NAME else name


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def base_model_record(base_model: torch.nn.Module, describe: dict[str, Any]) -> dict[str, Any]:
    """What an adapter records about its base: identity (name, revision) and shape (checked on load)."""
    config = base_model.config
    revision = getattr(config, "graftlm_revision", None) or getattr(config, "_commit_hash", None)
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": revision,
        "architecture": describe["architecture"],
        "model_type": describe["model_type"],
        "hidden_size": describe["hidden_size"],
        "num_hidden_layers": describe["num_hidden_layers"],
    }


def check_base_model(saved: dict[str, Any], current: dict[str, Any], adapter_path: str) -> None:
    """Raise when the adapter's base differs in shape or architecture; warn when only the name differs."""
    mismatches = [
        f"{key}: adapter has {saved.get(key)!r}, model has {current.get(key)!r}"
        for key in ("architecture", "model_type", "hidden_size", "num_hidden_layers")
        if saved.get(key) != current.get(key)
    ]
    if mismatches:
        saved_name, current_name = saved.get("name_or_path"), current.get("name_or_path")
        other = (f"not on this model ({current_name!r})" if saved_name != current_name
                 else "a model of the same name but another shape")
        raise AdapterBaseMismatchError(
            f"adapter {adapter_path} was trained on {saved_name!r}, {other}: " + "; ".join(mismatches)
        )
    if saved.get("name_or_path") and current.get("name_or_path") and saved["name_or_path"] != current["name_or_path"]:
        warnings.warn(
            f"adapter {adapter_path} was trained on {saved['name_or_path']!r}, loading it onto "
            f"{current['name_or_path']!r} (same architecture and shape)",
            stacklevel=3,
        )


def check_tensors(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], adapter_path: str) -> None:
    """Raise `AdapterTensorsError` naming every missing, unexpected or misshapen tensor, every tensor of a
    dtype that can't stand for the graft's (integer or bool for a float tensor), and every non-finite one."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    common = sorted(set(saved) & set(expected))
    misshapen = [f"{k}: saved {tuple(saved[k].shape)}, expected {tuple(expected[k].shape)}"
                 for k in common if saved[k].shape != expected[k].shape]
    wrong_dtype = [f"{k}: saved {saved[k].dtype}, expected {expected[k].dtype}" for k in common
                   if saved[k].is_floating_point() != expected[k].is_floating_point()
                   or (not expected[k].is_floating_point() and saved[k].dtype != expected[k].dtype)]
    non_finite = [k for k in common if saved[k].is_floating_point() and not bool(torch.isfinite(saved[k]).all())]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshapen:
        problems.append(f"wrong shapes {misshapen}")
    if wrong_dtype:
        problems.append(f"wrong dtypes {wrong_dtype} (refusing to cast them)")
    if non_finite:
        problems.append(f"non-finite values (NaN or inf) in {non_finite}")
    if problems:
        raise AdapterTensorsError(f"adapter {adapter_path}: " + "; ".join(problems))


def tensors_for_graft(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                      adapter_path: str) -> dict[str, torch.Tensor]:
    """The saved tensors checked (`check_tensors`) and moved to the graft's device and dtype.

    A float tensor saved in another float dtype is cast silently when the cast is exact (float16 or
    bfloat16 into float32), with an `AdapterDtypeWarning` naming the tensors when it loses precision.
    """
    check_tensors(saved, expected, adapter_path)
    cast, lossy = {}, []
    for name, value in saved.items():
        reference = expected[name]
        cast[name] = value.to(device=reference.device, dtype=reference.dtype)
        if value.dtype != reference.dtype and not torch.equal(cast[name].to("cpu", value.dtype), value):
            lossy.append(f"{name}: {value.dtype} -> {reference.dtype}")
    if lossy:
        warnings.warn(f"adapter {adapter_path}: casting {lossy} loses precision", AdapterDtypeWarning, stacklevel=3)
    return cast


@dataclass
class AdapterRecord:
    """One adapter to write: what goes into its ``adapter_config.json`` and ``adapter_model.safetensors``."""

    graft_type: str
    config: dict[str, Any]
    base: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def write_adapters(directory: str | os.PathLike, adapters: dict[str, AdapterRecord], overwrite: bool = False,
                   card: str | None = None) -> Path:
    """Write adapters into ``directory`` as one atomic replacement of its adapter files.

    ``adapters`` maps adapter names to adapters, in attach order: ``default`` goes to the root, any other
    name to a sub-folder of that name (a stacked save); ``graftlm_stack.json`` records the names in that
    order. ``card`` (a model card) is written as ``README.md`` unless the folder holds a README.md that
    is not a graftlm card: that one is kept, with a `ModelCardWarning` (``overwrite`` doesn't change that).

    Everything is written into a temporary folder beside ``directory``, read back and compared, and only
    then swapped in for ``directory`` (two renames), so a save that fails leaves what was there unchanged
    and loadable, and the folder afterwards holds exactly these adapters: no stale sub-adapter of an
    earlier save comes back. Everything in ``directory`` that is not part of the save there (a README.md
    of the user's, a tokenizer, other folders) is kept. Without ``overwrite``, replacing an adapter of
    another graft type or base, or dropping a saved adapter this save does not include, raises
    `FileExistsError` before anything is written. Saved files get the usual permissions (umask), the
    folder keeps its own.
    """
    target = Path(directory)
    if target.is_symlink():
        target = target.resolve()  # replace the folder the link points to, keep the link
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; refusing to save an adapter there")
    folders = {adapter_folder(name): adapter for name, adapter in adapters.items()}
    if target.is_dir() and not overwrite:
        _refuse_replacing(target, folders)
    if card is not None and not _may_write_card(target):
        warnings.warn(f"{target / CARD_NAME} is not a graftlm model card; kept it and wrote no card (add the "
                      f"card yourself, or remove that README.md to get one)", ModelCardWarning, stacklevel=3)
        card = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.graftlm-save-", dir=target.parent))
    umask = _umask()
    try:
        for folder, adapter in folders.items():
            _write_one(staging / folder, adapter, file_mode=0o666 & ~umask)
        extras = {STACK_NAME: json.dumps(_stack_record(adapters), indent=2) + "\n", CARD_NAME: card}
        for name, text in extras.items():
            if text is not None:
                (staging / name).write_text(text)
                os.chmod(staging / name, 0o666 & ~umask)
        for folder, adapter in folders.items():
            _verify_written(staging / folder, adapter)
        if any((staging / name).read_text() != text for name, text in extras.items() if text is not None):
            raise OSError(f"the files written to {staging} do not read back as written; nothing was saved")
        os.chmod(staging, stat.S_IMODE(target.stat().st_mode) if target.is_dir() else 0o777 & ~umask)
        _swap_in(staging, target, _saved_entries(target) if target.is_dir() else set())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _stack_record(adapters: dict[str, AdapterRecord]) -> dict[str, Any]:
    return {"graftlm_version": __version__,
            "adapters": [{"name": name, "graft_type": adapter.graft_type} for name, adapter in adapters.items()]}


def _may_write_card(target: Path) -> bool:
    card = target / CARD_NAME
    return not (card.exists() or card.is_symlink()) or _is_card_file(card)


def _is_card_file(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        return is_graftlm_card(path.read_text(errors="replace"))
    except OSError:
        return False


def _refuse_replacing(target: Path, folders: dict[str, AdapterRecord]) -> None:
    """Raise `FileExistsError` when the save would replace or drop something saved that it should not."""
    for folder, adapter in folders.items():
        where = target / folder
        config_path = where / CONFIG_NAME
        if folder and where.exists() and not config_path.exists():
            raise FileExistsError(f"{where} exists and is not a graftlm adapter; refusing to replace it with the "
                                  f"stacked adapter {folder!r} (pass overwrite=True to replace it)")
        if not config_path.exists():
            continue
        try:
            existing = json.loads(config_path.read_text())
            saved_base = existing.get("base_model") or {}
            saved_type, saved_name = existing.get("graft_type"), saved_base.get("name_or_path")
        except (OSError, ValueError, AttributeError) as err:
            raise FileExistsError(f"{config_path} exists but is not a readable adapter config ({err}); refusing "
                                  f"to replace it (pass overwrite=True to replace it)") from None
        if saved_type != adapter.graft_type or saved_name != adapter.base.get("name_or_path"):
            raise FileExistsError(
                f"{where} already holds a {saved_type!r} adapter for base {saved_name!r}; refusing to replace it "
                f"with a {adapter.graft_type!r} adapter for {adapter.base.get('name_or_path')!r} (pass "
                f"overwrite=True to replace it)"
            )
    try:
        saved = _saved_here(target)
    except AdapterConfigError as err:
        raise FileExistsError(f"{err}; refusing to replace what is saved there (pass overwrite=True to replace "
                              f"it)") from None
    dropped = [name if adapter_folder(name) else "(the adapter at the root)" for name, _ in saved
               if adapter_folder(name) not in folders]
    if dropped:
        raise FileExistsError(f"{target} holds saved adapters this save does not include: {', '.join(dropped)}; "
                              f"refusing to delete them (pass overwrite=True to replace the whole adapter folder)")


def _write_one(where: Path, adapter: AdapterRecord, file_mode: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    record = {"graft_type": adapter.graft_type, "graftlm_version": __version__, "config": adapter.config,
              "base_model": adapter.base}
    try:
        text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise TypeError(f"the {adapter.graft_type!r} adapter's config cannot be written as JSON ({err}); "
                        f"nothing was saved") from err
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors.items()}
    save_file(contiguous, where / WEIGHTS_NAME, metadata={"format": "pt", "graft_type": adapter.graft_type})
    (where / CONFIG_NAME).write_text(text)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        os.chmod(where / name, file_mode)  # safetensors writes 0600


def _verify_written(where: Path, adapter: AdapterRecord) -> None:
    """Read a freshly written adapter back; raise if it is not what was meant to be written."""
    record, tensors = read_adapter(where)
    same_record = (record["graft_type"] == adapter.graft_type
                   and record["config"] == json.loads(json.dumps(adapter.config))
                   and record["base_model"] == json.loads(json.dumps(adapter.base)))
    same_tensors = set(tensors) == set(adapter.tensors) and all(
        tensors[k].dtype == v.dtype and torch.equal(tensors[k], v.detach().to("cpu")) for k, v in adapter.tensors.items()
    )
    if not (same_record and same_tensors):
        raise OSError(f"the adapter written to {where} does not read back as written; nothing was saved")


def _swap_in(staging: Path, target: Path, replaced: set[str]) -> None:
    """Replace ``target`` by ``staging``, carrying over the entries of ``target`` that are neither in
    ``replaced`` (the save there before) nor written anew in ``staging``."""
    if not target.exists():
        os.rename(staging, target)
        return
    kept = [entry for entry in target.iterdir()
            if entry.name not in replaced and not (staging / entry.name).exists()]
    moved: list[Path] = []
    backup = None
    try:
        for entry in kept:
            os.rename(entry, staging / entry.name)
            moved.append(entry)
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.graftlm-old-", dir=target.parent))
        os.rename(target, backup)  # replaces the empty placeholder folder
        os.rename(staging, target)
    except BaseException:
        if backup is not None and not target.exists() and backup.exists():
            os.rename(backup, target)
        for entry in moved:
            os.rename(staging / entry.name, entry)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _saved_here(target: Path) -> list[tuple[str, Path]]:
    """`saved_adapters` of a folder a save goes to; a folder with neither a record nor a root adapter has
    none saved at its level (its sub-folders holding adapters are saves of their own, like a Trainer's
    ``checkpoint-N`` folders)."""
    if not (target / STACK_NAME).exists() and not (target / CONFIG_NAME).exists():
        return []
    return saved_adapters(target)


def _saved_entries(target: Path) -> set[str]:
    """The names of the entries of ``target`` that belong to the save there: its adapter files, stack
    record, graftlm card and the sub-folders of its adapters (what a new save replaces)."""
    try:
        folders = [folder for _, folder in _saved_here(target)]
    except AdapterConfigError:  # an unreadable record (overwrite=True got here): no sub-folder is known to be
        folders = []  # part of that save, so none is deleted; the new record leaves them out
    entries = {CONFIG_NAME, WEIGHTS_NAME, STACK_NAME} | {folder.name for folder in folders if folder != target}
    if _is_card_file(target / CARD_NAME):
        entries.add(CARD_NAME)
    return entries


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def resolve_adapter_dir(path_or_repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local adapter directory, or a Hub repo id downloaded through ``huggingface_hub``."""
    local = Path(path_or_repo_id)
    if local.is_dir():
        if not any((local / name).exists() for name in (CONFIG_NAME, STACK_NAME)) and not adapter_subdirectories(local):
            raise FileNotFoundError(f"{local} has no {CONFIG_NAME}: not a graftlm adapter directory")
        return local
    if local.exists() or path_or_repo_id.startswith((".", "/", "~")) or path_or_repo_id.count("/") > 1:
        raise FileNotFoundError(f"no adapter directory at {path_or_repo_id}")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                path_or_repo_id,
                revision=revision,
                token=token,
                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, STACK_NAME, f"*/{CONFIG_NAME}", f"*/{WEIGHTS_NAME}"],
            )
        )
    except Exception as err:
        raise FileNotFoundError(
            f"{path_or_repo_id!r} is not a local adapter directory and could not be fetched from the "
            f"Hugging Face Hub ({type(err).__name__}: {err})"
        ) from err


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The parsed ``adapter_config.json`` (warning when a newer graftlm wrote it) and the tensors.

    Raises `AdapterConfigError` / `AdapterTensorsError` naming the file when either cannot be read.
    """
    config_path = directory / CONFIG_NAME
    try:
        record = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterConfigError(f"{config_path} is not valid JSON ({err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterConfigError(f"{config_path} cannot be read ({err})") from None
    if not isinstance(record, dict):
        raise AdapterConfigError(f"{config_path} must hold a JSON object, not {type(record).__name__}")
    for key, kind in (("graft_type", str), ("config", dict), ("base_model", dict)):
        if key not in record:
            raise AdapterConfigError(f"{config_path} has no {key!r} entry: not a graftlm adapter config")
        if not isinstance(record[key], kind):
            raise AdapterConfigError(f"{config_path}: {key!r} must be a JSON {'string' if kind is str else 'object'}, "
                                     f"got {record[key]!r}")
    saved_version = str(record.get("graftlm_version", "0"))
    if _version_tuple(saved_version) > _version_tuple(__version__):
        warnings.warn(
            f"adapter {directory} was saved by graftlm {saved_version}, newer than this {__version__}",
            NewerVersionWarning,
            stacklevel=3,
        )
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise AdapterTensorsError(f"{weights} is not a readable safetensors file ({err})") from None
    return record, tensors


def adapter_subdirectories(directory: Path) -> list[Path]:
    """Sub-folders holding further adapters of a save made before the stack record (its non-default names).

    A sub-folder with its own ``graftlm_stack.json`` is a whole save of its own (a Trainer's
    ``checkpoint-N/``), never part of this one: sub-adapters of a stack never carry a record."""
    return sorted(p for p in directory.iterdir()
                  if p.is_dir() and (p / CONFIG_NAME).exists() and not (p / STACK_NAME).exists())


def saved_adapters(directory: Path) -> list[tuple[str, Path]]:
    """The adapters saved in ``directory`` as (saved name, folder), in the order they were attached.

    Those ``graftlm_stack.json`` lists, in its order (the root's saved name is ``default``; the graft
    types it records are for people and tools listing a stack: each adapter's config is what counts); a
    folder without that record (saved by graftlm before it wrote one) holds its root adapter, then every
    sub-folder holding an adapter, by name. Raises `AdapterConfigError` when the record can't be read or
    names an adapter that is not there.
    """
    record_path = directory / STACK_NAME
    if not record_path.exists():
        found = [(DEFAULT_ADAPTER_NAME, directory)] if (directory / CONFIG_NAME).exists() else []
        return found + [(sub.name, sub) for sub in adapter_subdirectories(directory)]
    try:
        record = json.loads(record_path.read_text())
        names = [entry["name"] for entry in record["adapters"]]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
        expected = '{"adapters": [{"name": ..., "graft_type": ...}, ...]}'
        raise AdapterConfigError(f"{record_path} is not a readable stack record ({type(err).__name__}: {err}); "
                                 f"expected {expected}") from None
    for name in names:
        try:
            check_adapter_name(name, f"{record_path}: adapter")
        except ValueError as err:
            raise AdapterConfigError(str(err)) from None
    if not names or len(set(names)) != len(names):
        raise AdapterConfigError(f"{record_path} must list each saved adapter once, got {names}")
    saved = []
    for name in names:
        folder = directory / adapter_folder(name)
        if not (folder / CONFIG_NAME).is_file():
            raise AdapterConfigError(f"{record_path} lists the adapter {name!r}, but {folder / CONFIG_NAME} does "
                                     f"not exist; was the folder edited by hand? Save the stack again")
        saved.append((name, folder))
    return saved
