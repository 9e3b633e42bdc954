"""ONNX -> ONNX passes (QDQ insertion, TensorRT lint, expert splitting) and graph inspection."""

__all__: list[str] = []
