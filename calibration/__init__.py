"""Hessian-aware W8A8 calibration (observers, smoothing, weight quantization, recipes): the next issue."""

__all__: list[str] = []
