"""PyTorch -> ONNX: export-time patchers, the traced wrapper with KV-cache I/O, ``export_model``.

The per-architecture configs live in ``moedge.arch``; they are re-exported here for convenience.
"""

from moedge.arch import ArchitectureConfig, get_config, supported_model_types

__all__ = ["ArchitectureConfig", "export_model", "get_config", "supported_model_types"]


def __getattr__(name: str) -> object:
    if name == "export_model":  # keeps `import moedge.export` free of torch until it is needed
        from moedge.export.exporter import export_model

        return export_model
    raise AttributeError(name)
