"""ONNX -> ONNX passes (QDQ insertion, TensorRT lint, expert splitting), the bundle writer, inspection."""

from moedge.graph_passes.bundle import split_bundle
from moedge.graph_passes.check_tensorrt import CheckTensorRTReadyPass, Finding, check_tensorrt_ready
from moedge.graph_passes.insert_qdq import InsertQDQPass, LinearQuant, load_linear_quant
from moedge.graph_passes.pipeline import run_passes
from moedge.graph_passes.split_experts import SplitExpertsPass, SplitModel

__all__ = [
    "CheckTensorRTReadyPass",
    "Finding",
    "InsertQDQPass",
    "LinearQuant",
    "SplitExpertsPass",
    "SplitModel",
    "check_tensorrt_ready",
    "load_linear_quant",
    "run_passes",
    "split_bundle",
]
