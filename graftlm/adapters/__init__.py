"""Grafts (one module each) and the shared attach/save/load machinery."""

from graftlm.adapters.attractor import AttractorConfig
from graftlm.adapters.config import GraftConfig, GraftConfigError, GraftConfigWarning
from graftlm.adapters.echo import EchoConfig
from graftlm.adapters.graft import Graft
from graftlm.adapters.graft_cache import CacheCropError, GraftCache, GraftState
from graftlm.adapters.io import (
    AdapterBaseMismatchError,
    AdapterConfigError,
    AdapterDtypeWarning,
    AdapterTensorsError,
    ModelCardWarning,
    NewerVersionWarning,
)
from graftlm.adapters.lora import LoRAConfig
from graftlm.adapters.model import (
    DEFAULT_ADAPTER_NAME,
    BaseAlreadyGraftedError,
    GraftModel,
    UnsupportedGenerationError,
    attach_adapter,
    trainable_state_dict,
)
from graftlm.adapters.range_search import RangeSearchConfig
from graftlm.adapters.registry import (
    UnknownGraftTypeError,
    get_graft_type,
    register_graft,
    registered_graft_types,
)
from graftlm.adapters.sst import SSTConfig

__all__ = [
    "DEFAULT_ADAPTER_NAME",
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
    "GraftConfigWarning",
    "GraftModel",
    "GraftState",
    "LoRAConfig",
    "ModelCardWarning",
    "NewerVersionWarning",
    "RangeSearchConfig",
    "SSTConfig",
    "UnknownGraftTypeError",
    "UnsupportedGenerationError",
    "attach_adapter",
    "get_graft_type",
    "register_graft",
    "registered_graft_types",
    "trainable_state_dict",
]
