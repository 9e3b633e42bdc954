"""Run exported models and bundles on a device with numpy, ONNX Runtime and tokenizers only (never torch)."""

from moedge.formats.export_folder import ExportInfo, is_exported_folder, read_export_info
from moedge.runtime.bundle_runner import BundleRunner, RoutingTrace
from moedge.runtime.decoding import Generation, Sampling, StopRule, generate, greedy
from moedge.runtime.gating import route
from moedge.runtime.generator import Generator
from moedge.runtime.ort_causal_lm import OrtCausalLM

__all__ = [
    "BundleRunner",
    "ExportInfo",
    "Generation",
    "Generator",
    "OrtCausalLM",
    "RoutingTrace",
    "Sampling",
    "StopRule",
    "generate",
    "greedy",
    "is_exported_folder",
    "read_export_info",
    "route",
]
