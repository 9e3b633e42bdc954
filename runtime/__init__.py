"""Run exported models on a device with numpy, ONNX Runtime and tokenizers only (never torch)."""

from moedge.runtime.exported import ExportInfo, is_exported_folder, read_export_info
from moedge.runtime.ort_causal_lm import OrtCausalLM

__all__ = ["ExportInfo", "OrtCausalLM", "is_exported_folder", "read_export_info"]
