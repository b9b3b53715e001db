"""Adapter files on disk and on the Hub: ``adapter_config.json`` + ``adapter_model.safetensors``.

``adapter_config.json``::

    {"graft_type": "sst", "graftlm_version": "0.1.0", "config": {...the graft's dataclass...},
     "base_model": {"name_or_path": ..., "revision": ..., "architecture": ..., "model_type": ...,
                    "hidden_size": ..., "num_hidden_layers": ...}}

``adapter_model.safetensors`` holds only the graft's tensors.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from graftlm import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterBaseMismatchError(ValueError):
    """The adapter was trained on a base model of a different shape or architecture."""


class AdapterTensorsError(ValueError):
    """The saved tensors don't match what the graft expects (missing, unexpected or misshapen)."""


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
    """Raise `AdapterTensorsError` naming every missing, unexpected or misshapen tensor."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    misshapen = sorted(
        f"{k}: saved {tuple(saved[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in set(saved) & set(expected)
        if saved[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshapen:
        problems.append(f"wrong shapes {misshapen}")
    if problems:
        raise AdapterTensorsError(f"adapter {adapter_path}: " + "; ".join(problems))


def write_adapter(
    directory: str | os.PathLike,
    graft_type: str,
    config: dict[str, Any],
    base: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    overwrite: bool = False,
) -> Path:
    """Write one adapter. An existing adapter of another graft type or base is never replaced silently."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if config_path.exists() and not overwrite:
        existing = json.loads(config_path.read_text())
        same_graft = existing.get("graft_type") == graft_type
        same_base = existing.get("base_model", {}).get("name_or_path") == base.get("name_or_path")
        if not (same_graft and same_base):
            raise FileExistsError(
                f"{directory} already holds a {existing.get('graft_type')!r} adapter for base "
                f"{existing.get('base_model', {}).get('name_or_path')!r}; refusing to replace it with a "
                f"{graft_type!r} adapter for {base.get('name_or_path')!r} (pass overwrite=True to replace it)"
            )
    directory.mkdir(parents=True, exist_ok=True)
    record = {"graft_type": graft_type, "graftlm_version": __version__, "config": config, "base_model": base}
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(contiguous, directory / WEIGHTS_NAME, metadata={"format": "pt", "graft_type": graft_type})
    config_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return directory


def resolve_adapter_dir(path_or_repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local adapter directory, or a Hub repo id downloaded through ``huggingface_hub``."""
    local = Path(path_or_repo_id)
    if local.is_dir():
        if not (local / CONFIG_NAME).exists():
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
    """The parsed ``adapter_config.json`` (warning when a newer graftlm wrote it) and the tensors."""
    record = json.loads((directory / CONFIG_NAME).read_text())
    for key in ("graft_type", "config", "base_model"):
        if key not in record:
            raise ValueError(f"{directory / CONFIG_NAME} has no {key!r} entry: not a graftlm adapter config")
    saved_version = record.get("graftlm_version", "0")
    if _version_tuple(saved_version) > _version_tuple(__version__):
        warnings.warn(
            f"adapter {directory} was saved by graftlm {saved_version}, newer than this {__version__}",
            NewerVersionWarning,
            stacklevel=3,
        )
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return record, load_file(weights)


def adapter_subdirectories(directory: Path) -> list[Path]:
    """Sub-folders holding further adapters (non-default names of a stacked save)."""
    return sorted(p for p in directory.iterdir() if p.is_dir() and (p / CONFIG_NAME).exists())
