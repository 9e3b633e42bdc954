"""One small declarative export config per supported architecture, registered by decorator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moedge._errors import MoedgeError


@dataclass(frozen=True, kw_only=True)
class ArchitectureConfig:
    """What the exporter needs to know about one model family.

    ``experts_path`` names the fused experts module inside each decoder layer for MoE models
    (transformers 5.x stores experts as 3-D ``gate_up_proj``/``down_proj`` tensors); the export patcher
    rewrites it into one module per expert. ``shared_expert_path`` names an always-on expert (Qwen2-MoE).
    """

    name: str
    model_types: tuple[str, ...]
    experts_path: str | None = None
    router_path: str | None = None
    shared_expert_path: str | None = None
    logits_atol: float = 1e-4

    @property
    def is_moe(self) -> bool:
        """Whether the family routes tokens to experts."""
        return self.experts_path is not None

    def num_kv_heads(self, hf_config: Any) -> int:
        """Key/value heads per layer, as the KV-cache tensors carry them."""
        return int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)

    def head_dim(self, hf_config: Any) -> int:
        """Per-head width of the KV-cache tensors."""
        explicit = getattr(hf_config, "head_dim", None)
        return int(explicit or hf_config.hidden_size // hf_config.num_attention_heads)

    def num_experts(self, hf_config: Any) -> int:
        """Routed experts per MoE layer (0 for dense models)."""
        if not self.is_moe:
            return 0
        return int(getattr(hf_config, "num_local_experts", None) or hf_config.num_experts)


_REGISTRY: dict[str, ArchitectureConfig] = {}


def register(config: ArchitectureConfig) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Register ``config`` for each of its ``model_types`` (used as a decorator on a doc stub)."""

    def decorate(fn: Callable[[], None]) -> Callable[[], None]:
        for model_type in config.model_types:
            _REGISTRY[model_type] = config
        return fn

    return decorate


@register(ArchitectureConfig(name="llama", model_types=("llama", "mistral")))
def _llama() -> None:
    """Llama and Mistral: dense decoder, RMSNorm, RoPE, GQA, gated SiLU MLP."""


@register(ArchitectureConfig(name="opt", model_types=("opt",)))
def _opt() -> None:
    """OPT: dense decoder, LayerNorm, learned positions, fc1 -> ReLU -> fc2."""


@register(
    ArchitectureConfig(
        name="mixtral", model_types=("mixtral",), experts_path="mlp.experts", router_path="mlp.gate"
    )
)
def _mixtral() -> None:
    """Mixtral: top-k routing, softmax then top-k, renormalized weights."""


@register(
    ArchitectureConfig(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        experts_path="mlp.experts",
        router_path="mlp.gate",
        shared_expert_path="mlp.shared_expert",
    )
)
def _qwen2_moe() -> None:
    """Qwen2-MoE: routed experts plus a shared expert behind a sigmoid gate."""


@register(
    ArchitectureConfig(
        name="olmoe", model_types=("olmoe",), experts_path="mlp.experts", router_path="mlp.gate"
    )
)
def _olmoe() -> None:
    """OLMoE: 64-expert top-8 routing, q/k RMSNorm."""


def supported_model_types() -> tuple[str, ...]:
    """Every ``model_type`` moedge exports."""
    return tuple(sorted(_REGISTRY))


def get_config(model_type: str) -> ArchitectureConfig:
    """The export config for a ``model_type``, or a clear error naming the supported ones."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise MoedgeError(
            f"unsupported architecture '{model_type}': moedge supports {', '.join(supported_model_types())}"
        ) from None
