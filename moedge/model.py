"""The in-memory model handle every pipeline step takes: weights, tokenizer and where they came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch, transformers and tokenizers stay off the runtime import path
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel


@dataclass(kw_only=True)
class LoadedModel:
    """A PyTorch causal LM in eval mode, its tokenizer, and its provenance."""

    model: PreTrainedModel
    tokenizer: Tokenizer
    name: str
    source: str
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        """The Hugging Face ``model_type`` (``llama``, ``mixtral``, ...)."""
        return str(self.model.config.model_type)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens dropped."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
