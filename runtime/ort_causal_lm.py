"""Run a monolithic exported model in ONNX Runtime with an explicit KV cache (numpy only)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.export_folder import ExportInfo, read_export_info
from moedge.formats.external_data import check_external_data
from moedge.ort_sessions import load_session, session_options
from moedge.runtime.ort_session import KVCache, empty_cache, step_inputs

log = logging.getLogger(__name__)


class OrtCausalLM:
    """An exported folder as one ONNX Runtime session: forward and scoring (generation: ``moedge.runtime.decoding``)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        optimize: bool = True,
    ) -> None:
        self.info: ExportInfo = read_export_info(folder)
        options = session_options(intra_op_threads=intra_op_threads, optimize=optimize)
        check_external_data(self.info.model_file)  # an export is read only from its own folder
        self.session = load_session(self.info.model_file, options, providers)

    @property
    def uses_cache(self) -> bool:
        """Whether the export carries a KV cache (without one, every step feeds the whole sequence)."""
        return self.info.with_cache

    def empty_cache(self, batch: int) -> KVCache:
        """A zero-length cache for ``batch`` sequences."""
        return empty_cache(batch, self.info.num_layers, self.info.num_kv_heads, self.info.head_dim)

    def forward(
        self,
        input_ids: np.ndarray,
        *,
        past: KVCache | None = None,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        last_only: bool = False,
    ) -> tuple[np.ndarray, KVCache]:
        """Logits for ``input_ids`` (batch x seq) after ``past`` (``last_only``: the last position's,
        cut from the graph's full output); returns the extended cache."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch = input_ids.shape[0]
        if self.info.with_cache:
            past = past if past is not None else self.empty_cache(batch)
            past_len = past[0].shape[2]
        else:
            if past:
                raise MoedgeError(f"{self.info.folder} was exported without a KV cache (--no-cache)")
            past_len = 0
        feeds = step_inputs(input_ids, past_len, attention_mask, position_ids)
        if self.info.with_cache:
            assert past is not None
            feeds.update(zip(self.info.inputs[3:], past, strict=True))
        outputs = self.session.run(None, feeds)
        logits = outputs[0][:, -1:] if last_only else outputs[0]
        return logits, list(outputs[1:])
