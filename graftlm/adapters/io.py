"""Adapter files on disk and on the Hub: ``adapter_config.json`` + ``adapter_model.safetensors``.

``adapter_config.json``::

    {"graft_type": "sst", "graftlm_version": "0.1.0", "config": {...the graft's dataclass...},
     "base_model": {"name_or_path": ..., "revision": ..., "architecture": ..., "model_type": ...,
                    "hidden_size": ..., "num_hidden_layers": ...}}

``adapter_model.safetensors`` holds only the graft's tensors. A stacked save puts the adapter named
``default`` at the root and every other one in a sub-folder named after it. Saving is atomic
(`write_adapters`); reading refuses, naming the file, anything it cannot use (`read_adapter`,
`tensors_for_graft`).
"""

from __future__ import annotations

import json
import os
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

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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
        raise AdapterBaseMismatchError(
            f"adapter {adapter_path} was trained on {saved.get('name_or_path')!r}, not on this model "
            f"({current.get('name_or_path')!r}): " + "; ".join(mismatches)
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


def write_adapters(directory: str | os.PathLike, adapters: dict[str, AdapterRecord], overwrite: bool = False) -> Path:
    """Write adapters into ``directory`` as one atomic replacement of its adapter files.

    ``adapters`` maps a folder to its adapter: ``""`` is the root, any other key a sub-folder of that name
    (a stacked save). Everything is written into a temporary folder beside ``directory``, read back and
    compared, and only then swapped in for ``directory`` (two renames), so a save that fails leaves what
    was there unchanged and loadable, and the folder afterwards holds exactly these adapters: no stale
    sub-adapter of an earlier save comes back. Files in ``directory`` that are not adapter files (a
    README.md, a tokenizer) are kept. Without ``overwrite``, replacing an adapter of another graft type
    or base, or dropping a saved adapter this save does not include, raises `FileExistsError` before
    anything is written. Saved files get the usual permissions (umask), the folder keeps its own.
    """
    target = Path(directory)
    if target.is_symlink():
        target = target.resolve()  # replace the folder the link points to, keep the link
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; refusing to save an adapter there")
    if target.is_dir() and not overwrite:
        _refuse_replacing(target, adapters)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.graftlm-save-", dir=target.parent))
    umask = _umask()
    try:
        for folder, adapter in adapters.items():
            _write_one(staging / folder, adapter, file_mode=0o666 & ~umask)
        for folder, adapter in adapters.items():
            _verify_written(staging / folder, adapter)
        os.chmod(staging, stat.S_IMODE(target.stat().st_mode) if target.is_dir() else 0o777 & ~umask)
        _swap_in(staging, target, new_folders={folder for folder in adapters if folder})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _refuse_replacing(target: Path, adapters: dict[str, AdapterRecord]) -> None:
    """Raise `FileExistsError` when the save would replace or drop something saved that it should not."""
    for folder, adapter in adapters.items():
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
    dropped = [sub.name for sub in adapter_subdirectories(target) if sub.name not in adapters]
    if (target / CONFIG_NAME).exists() and "" not in adapters:
        dropped.insert(0, "(the adapter at the root)")
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


def _swap_in(staging: Path, target: Path, new_folders: set[str]) -> None:
    """Replace ``target`` by ``staging``, carrying over the entries of ``target`` that are not adapter files."""
    if not target.exists():
        os.rename(staging, target)
        return
    kept = [entry for entry in target.iterdir() if not _is_adapter_entry(entry) and entry.name not in new_folders]
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


def _is_adapter_entry(entry: Path) -> bool:
    if entry.name in (CONFIG_NAME, WEIGHTS_NAME):
        return True
    return entry.is_dir() and not entry.is_symlink() and (entry / CONFIG_NAME).exists()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def resolve_adapter_dir(path_or_repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local adapter directory, or a Hub repo id downloaded through ``huggingface_hub``."""
    local = Path(path_or_repo_id)
    if local.is_dir():
        if not (local / CONFIG_NAME).exists() and not adapter_subdirectories(local):
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
                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, f"*/{CONFIG_NAME}", f"*/{WEIGHTS_NAME}"],
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
    """Sub-folders holding further adapters (non-default names of a stacked save)."""
    return sorted(p for p in directory.iterdir() if p.is_dir() and (p / CONFIG_NAME).exists())
