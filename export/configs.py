"""One small declarative export config per supported architecture, registered by decorator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moedge._errors import MoedgeError


@dataclass(frozen=True, kw_only=True)
class ArchitectureConfig:
    """What the exporter needs to know about one model family.

    ``experts_path`` names the fused experts module inside each decoder layer for MoE models
    (transformers 5.x stores experts as 3-D ``gate_up_proj``/``down_proj`` tensors); the export patcher
    rewrites it into one module per expert. ``router_path`` and ``shared_expert_path`` (an always-on
    expert, Qwen2-MoE) are for the split pass, which cuts the graph by those module names.
    ``normalize_top_k`` says whether the chosen experts' softmax scores are renormalized to sum to one:
    always (True), never (False), or as the named HF config flag says.
    """

    name: str
    model_types: tuple[str, ...]
    description: str
    experts_path: str | None = None
    router_path: str | None = None
    shared_expert_path: str | None = None
    normalize_top_k: bool | str = False

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

    def gating_rule(self, hf_config: Any) -> dict[str, Any] | None:
        """The MoE gating as the bundle manifest states it (None for dense models)."""
        if not self.is_moe:
            return None
        norm = self.normalize_top_k
        return {
            "scoring": "softmax",
            "top_k": int(hf_config.num_experts_per_tok),
            "normalize_top_k": bool(getattr(hf_config, norm, False) if isinstance(norm, str) else norm),
            "shared_expert": self.shared_expert_path is not None,
        }


_REGISTRY: dict[str, ArchitectureConfig] = {}


def register(config: ArchitectureConfig) -> ArchitectureConfig:
    """Make ``config`` the export config of each of its ``model_types``."""
    for model_type in config.model_types:
        _REGISTRY[model_type] = config
    return config


register(
    ArchitectureConfig(
        name="llama",
        model_types=("llama", "mistral"),
        description="dense decoder, RMSNorm, RoPE, GQA, gated SiLU MLP",
    )
)
register(
    ArchitectureConfig(
        name="opt", model_types=("opt",), description="dense decoder, LayerNorm, learned positions, ReLU MLP"
    )
)
register(
    ArchitectureConfig(
        name="mixtral",
        model_types=("mixtral",),
        description="softmax, top-k, renormalized weights",
        experts_path="mlp.experts",
        router_path="mlp.gate",
        normalize_top_k=True,
    )
)
register(
    ArchitectureConfig(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        description="routed experts plus a shared expert behind a sigmoid gate",
        experts_path="mlp.experts",
        router_path="mlp.gate",
        shared_expert_path="mlp.shared_expert",
        normalize_top_k="norm_topk_prob",
    )
)
register(
    ArchitectureConfig(
        name="olmoe",
        model_types=("olmoe",),
        description="many small experts, q/k RMSNorm",
        experts_path="mlp.experts",
        router_path="mlp.gate",
        normalize_top_k="norm_topk_prob",
    )
)


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
