"""What moedge knows about each supported model family, in one declarative entry per family.

Everything the pipeline needs to know about an architecture lives here: which HF ``model_type``s it
covers, where the MoE experts and router sit inside a decoder layer, how the gating renormalizes,
whether prompts start with BOS, which norm feeds which linears (the smoothing map calibration folds
through, ``smoothing.py``), and the example inputs and dynamic shapes the exporter traces with.
Calibration, export, graph passes and the runtime read these facts instead of testing model names.

``import moedge.arch`` stays free of torch: the torch-level helpers (``moedge.arch.per_expert``,
``moedge.arch.dummy_inputs``) are imported by whoever needs them.
"""

from moedge.arch.config import ArchitectureConfig
from moedge.arch.registry import (
    get_by_name,
    get_config,
    register,
    smoothable_model_types,
    smoothing_map,
    supported_model_types,
)

__all__ = [
    "ArchitectureConfig",
    "get_by_name",
    "get_config",
    "register",
    "smoothable_model_types",
    "smoothing_map",
    "supported_model_types",
]
