"""moedge: Hugging Face LLMs (dense and MoE) to deployable W8A8 engines for NVIDIA edge hardware.

The public API is small; heavy dependencies (torch, transformers, onnx) load only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moedge._errors import MoedgeError
from moedge.model import LoadedModel

__version__ = "0.1.0"

if TYPE_CHECKING:
    from moedge.calibration import CalibrationConfig, apply_recipe, calibrate, save_recipe
    from moedge.evaluation import PerplexityResult, perplexity
    from moedge.export.exporter import ExportResult, export_model
    from moedge.graph_passes.bundle import split_bundle
    from moedge.loading import load_model
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.runtime.ort_causal_lm import OrtCausalLM

__all__ = [
    "BundleRunner",
    "CalibrationConfig",
    "ExportResult",
    "LoadedModel",
    "MoedgeError",
    "OrtCausalLM",
    "PerplexityResult",
    "__version__",
    "apply_recipe",
    "calibrate",
    "export_model",
    "load_model",
    "perplexity",
    "save_recipe",
    "split_bundle",
]

_LAZY = {
    "calibrate": "moedge.calibration",
    "CalibrationConfig": "moedge.calibration",
    "apply_recipe": "moedge.calibration",
    "save_recipe": "moedge.calibration",
    "load_model": "moedge.loading",
    "export_model": "moedge.export.exporter",
    "ExportResult": "moedge.export.exporter",
    "perplexity": "moedge.evaluation",
    "PerplexityResult": "moedge.evaluation",
    "OrtCausalLM": "moedge.runtime.ort_causal_lm",
    "BundleRunner": "moedge.runtime.bundle_runner",
    "split_bundle": "moedge.graph_passes.bundle",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moedge' has no attribute {name!r}")
