"""The supported families, one ``ArchitectureConfig`` each, and lookup by HF ``model_type``."""

from __future__ import annotations

from dataclasses import replace

from moedge._errors import MoedgeError
from moedge.arch.config import ArchitectureConfig
from moedge.arch.smoothing import LLAMA_LIKE, OPT_MAP, SmoothingMap

_REGISTRY: dict[str, ArchitectureConfig] = {}


def register(config: ArchitectureConfig) -> ArchitectureConfig:
    """Make ``config`` the config of each of its ``model_types``; returns it."""
    for model_type in config.model_types:
        _REGISTRY[model_type] = config
    return config


LLAMA = register(
    ArchitectureConfig(
        name="llama",
        model_types=("llama", "mistral"),
        description="dense decoder, RMSNorm, RoPE, GQA, gated SiLU MLP",
        prepend_bos=True,
        smoothing=LLAMA_LIKE,
    )
)
OPT = register(
    ArchitectureConfig(
        name="opt",
        model_types=("opt",),
        description="dense decoder, LayerNorm, learned positions, ReLU MLP",
        smoothing=OPT_MAP,
    )
)
MIXTRAL = register(
    ArchitectureConfig(
        name="mixtral",
        model_types=("mixtral",),
        description="softmax, top-k, renormalized weights",
        experts_path="mlp.experts",
        router_path="mlp.gate",
        normalize_top_k=True,
        smoothing=LLAMA_LIKE,
    )
)
QWEN2_MOE = register(
    ArchitectureConfig(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        description="routed experts plus a shared expert behind a sigmoid gate",
        experts_path="mlp.experts",
        router_path="mlp.gate",
        shared_expert_path="mlp.shared_expert",
        normalize_top_k="norm_topk_prob",
        smoothing=replace(LLAMA_LIKE, shared_expert_gate="mlp.shared_expert_gate"),
    )
)
OLMOE = register(
    ArchitectureConfig(
        name="olmoe",
        model_types=("olmoe",),
        description="many small experts, q/k RMSNorm",
        experts_path="mlp.experts",
        router_path="mlp.gate",
        normalize_top_k="norm_topk_prob",
        smoothing=LLAMA_LIKE,
    )
)


def supported_model_types() -> tuple[str, ...]:
    """Every ``model_type`` moedge supports."""
    return tuple(sorted(_REGISTRY))


def get_config(model_type: str) -> ArchitectureConfig:
    """The config for a ``model_type``, or a clear error naming the supported ones."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise MoedgeError(
            f"unsupported architecture '{model_type}': moedge supports {', '.join(supported_model_types())}"
        ) from None


def smoothable_model_types() -> tuple[str, ...]:
    """Every ``model_type`` whose family has a smoothing map (the ones calibration supports)."""
    return tuple(t for t in supported_model_types() if _REGISTRY[t].smoothing is not None)


def smoothing_map(model_type: str) -> SmoothingMap:
    """The smoothing map of a ``model_type``'s family, or a clear error naming the types that have one."""
    config = _REGISTRY.get(model_type)
    if config is None or config.smoothing is None:
        raise MoedgeError(
            f"no smoothing map for model type {model_type!r}; calibration supports "
            f"{', '.join(smoothable_model_types())}"
        )
    return config.smoothing


def get_by_name(name: str) -> ArchitectureConfig | None:
    """The config whose ``name`` (as an export or bundle records it under ``architecture``) is ``name``."""
    return next((c for c in _REGISTRY.values() if c.name == name), None)
