"""``ArchitectureConfig``: the declarative description of one model family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moedge.arch.smoothing import SmoothingMap
from moedge.formats.manifest import GatingRule


@dataclass(frozen=True, kw_only=True)
class ArchitectureConfig:
    """What the pipeline needs to know about one model family.

    ``experts_path`` names the fused experts module inside each decoder layer for MoE models
    (transformers 5.x stores experts as 3-D ``gate_up_proj``/``down_proj`` tensors); the export patcher
    rewrites it into one module per expert. ``router_path`` and ``shared_expert_path`` (an always-on
    expert, Qwen2-MoE) are for the split pass, which cuts the graph by those module names.
    ``normalize_top_k`` says whether the chosen experts' softmax scores are renormalized to sum to one:
    always (True), never (False), or as the named HF config flag says. ``prepend_bos`` says whether a
    text prompt starts with the BOS token (SentencePiece Llama tokenizers do not add it themselves).
    ``smoothing`` names the modules of a decoder layer that calibration folds smoothing scales through
    (``moedge.arch.smoothing``); None: the family cannot be calibrated.
    """

    name: str
    model_types: tuple[str, ...]
    description: str
    experts_path: str | None = None
    router_path: str | None = None
    shared_expert_path: str | None = None
    normalize_top_k: bool | str = False
    prepend_bos: bool = False
    smoothing: SmoothingMap | None = None

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

    def gating_rule(self, hf_config: Any) -> GatingRule | None:
        """The MoE gating every layer of the model applies, as the bundle manifest states it.

        ``hf_config`` is an HF config object or its ``to_dict()`` (an export's ``config.json``).
        None for dense models.
        """
        if not self.is_moe:
            return None

        def get(key: str, default: Any = None) -> Any:
            if isinstance(hf_config, dict):
                return hf_config.get(key, default)
            return getattr(hf_config, key, default)

        norm = self.normalize_top_k
        return GatingRule(
            scoring="softmax",
            top_k=int(get("num_experts_per_tok")),
            normalize_top_k=bool(get(norm, False) if isinstance(norm, str) else norm),
            shared_expert=self.shared_expert_path is not None,
        )
