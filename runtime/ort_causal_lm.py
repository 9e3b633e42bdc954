"""Run a monolithic exported model in ONNX Runtime with an explicit KV cache (numpy only)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moedge._errors import MoedgeError
from moedge.runtime.exported import ExportInfo, read_export_info

log = logging.getLogger(__name__)

KVCache = list[np.ndarray]


class OrtCausalLM:
    """An exported folder as one ONNX Runtime session: forward, scoring and greedy generation."""

    def __init__(
        self,
        folder: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        optimize: bool = True,
    ) -> None:
        self.info: ExportInfo = read_export_info(folder)
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if not optimize:  # ORT runs the graph op for op (its fusions change float rounding)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(self.info.model_file), sess_options=options, providers=list(providers)
            )
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            raise MoedgeError(f"ONNX Runtime cannot load {self.info.model_file}: {exc}") from None

    def empty_cache(self, batch: int) -> KVCache:
        """A zero-length cache for ``batch`` sequences."""
        shape = (batch, self.info.num_kv_heads, 0, self.info.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.info.num_layers)]

    def forward(
        self,
        input_ids: np.ndarray,
        *,
        past: KVCache | None = None,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, KVCache]:
        """Logits for ``input_ids`` (batch x seq) after ``past``; returns the extended cache."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        if self.info.with_cache:
            past = past if past is not None else self.empty_cache(batch)
            past_len = past[0].shape[2]
        else:
            if past:
                raise MoedgeError(f"{self.info.folder} was exported without a KV cache (--no-cache)")
            past_len = 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        }
        if self.info.with_cache:
            assert past is not None
            feeds.update(zip(self.info.inputs[3:], past, strict=True))
        outputs = self.session.run(None, feeds)
        return outputs[0], list(outputs[1:])

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Greedy continuation of one prompt using the KV cache (or full recompute without one)."""
        ids = list(prompt_ids)
        if not ids:
            raise MoedgeError("generation needs at least one prompt token")
        new: list[int] = []
        past: KVCache | None = None
        step_input = np.asarray([ids], dtype=np.int64)
        for _ in range(max_new_tokens):
            logits, present = self.forward(
                step_input if self.info.with_cache else np.asarray([ids]), past=past
            )
            token = int(np.argmax(logits[0, -1]))
            new.append(token)
            ids.append(token)
            if on_token is not None:
                on_token(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            if self.info.with_cache:
                past = present
                step_input = np.asarray([[token]], dtype=np.int64)
        return new
