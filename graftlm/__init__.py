"""graftlm: graft reasoning and memory mechanisms onto frozen pretrained causal LMs.

    model, tokenizer = graftlm.load_model("smollm2-135m")
    model = graftlm.attach_adapter(model, graftlm.SSTConfig())     # or a saved adapter's dir / Hub id
    ...train only the graft...
    model.save_pretrained("out")                                    # adapter only (+ model card)

Training with transformers.Trainer / TRL: ``graftlm.GraftTrainer``, ``graftlm.GraftSFTTrainer``.
"""

__version__ = "0.1.0"

from graftlm.adapters import (
    AdapterBaseMismatchError,
    AdapterConfigError,
    AdapterDtypeWarning,
    AdapterTensorsError,
    AttractorConfig,
    BaseAlreadyGraftedError,
    CacheCropError,
    EchoConfig,
    Graft,
    GraftCache,
    GraftConfig,
    GraftConfigError,
    GraftModel,
    LoRAConfig,
    RangeSearchConfig,
    SSTConfig,
    UnknownGraftTypeError,
    UnsupportedGenerationError,
    attach_adapter,
    register_graft,
    registered_graft_types,
)
from graftlm.models import EMBEDDED_CHECKPOINTS, load_model
from graftlm.patches import UnsupportedArchitectureError, get_patch

__all__ = [
    "EMBEDDED_CHECKPOINTS",
    "AdapterBaseMismatchError",
    "AdapterConfigError",
    "AdapterDtypeWarning",
    "AdapterTensorsError",
    "AttractorConfig",
    "BaseAlreadyGraftedError",
    "CacheCropError",
    "EchoConfig",
    "Graft",
    "GraftCache",
    "GraftConfig",
    "GraftConfigError",
    "GraftModel",
    "LoRAConfig",
    "RangeSearchConfig",
    "SSTConfig",
    "UnknownGraftTypeError",
    "UnsupportedArchitectureError",
    "UnsupportedGenerationError",
    "__version__",
    "attach_adapter",
    "get_patch",
    "load_model",
    "register_graft",
    "registered_graft_types",
]

_TRAINERS = ("GraftTrainer", "GraftTrainerMixin", "GraftSFTTrainer")


def __getattr__(name: str):
    if name in _TRAINERS:  # graftlm.trainer imports transformers.Trainer (and GraftSFTTrainer trl): on first use
        from graftlm import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
