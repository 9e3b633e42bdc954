"""The reference orchestrator: run a bundle in ONNX Runtime CPU sessions with numpy routing.

Per step: embedding stage, then per layer the stage graph, the gating rule on its router logits, each
chosen expert on its routed tokens, the weighted combine in expert order, and the residual add; then
the head. It is the exactness reference the cached CPU/GPU runtime is measured against. numpy and
onnxruntime only (no torch, no transformers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moedge._errors import MoedgeError
from moedge.manifest import (
    EXPERT_INPUT,
    HIDDEN,
    HIDDEN_OUT,
    LOGITS,
    MOE_INPUT,
    RESIDUAL,
    ROUTER_LOGITS,
    SHARED_OUTPUT,
    GraphSpec,
    Manifest,
    read_manifest,
)
from moedge.runtime.gating import route
from moedge.runtime.ort_session import (
    KVCache,
    empty_cache,
    generate_greedy,
    load_session,
    session_options,
    step_inputs,
)

log = logging.getLogger(__name__)


@dataclass
class RoutingTrace:
    """Which experts each layer chose in one forward call: layer -> (tokens x top_k) indices."""

    chosen: dict[int, np.ndarray] = field(default_factory=dict)
    weights: dict[int, np.ndarray] = field(default_factory=dict)
    logits: dict[int, np.ndarray] = field(default_factory=dict)


class BundleRunner:
    """A bundle folder as ORT CPU sessions (experts created on first use) with the model's exact gating."""

    def __init__(
        self,
        bundle: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        verify: bool = True,
        optimize: bool = True,
        spinning: bool = False,
    ) -> None:
        self.folder = Path(bundle)
        self.manifest: Manifest = read_manifest(self.folder, verify=verify)
        # Hundreds of sessions each keep a thread pool: spinning pools steal the cores from the one
        # session running (measured by benchmarks/bundle_speed.py --parts spinning).
        self.options = session_options(
            intra_op_threads=intra_op_threads, optimize=optimize, spinning=spinning, quiet=True
        )
        self.providers = list(providers)
        self._sessions: dict[str, ort.InferenceSession] = {}
        model = self.manifest.model
        self.num_layers = len(self.manifest.layers)
        self.num_kv_heads = int(model["num_kv_heads"])
        self.head_dim = int(model["head_dim"])
        self.eos_token_id = model.get("eos_token_id")

    def session(self, graph: GraphSpec) -> ort.InferenceSession:
        """The ORT session of one bundle graph, created on first use."""
        sess = self._sessions.get(graph.file)
        if sess is None:
            sess = self._sessions[graph.file] = load_session(
                self.folder / graph.file, self.options, self.providers
            )
        return sess

    def _run(self, graph: GraphSpec, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            feeds = {name: values[name] for name in graph.input_names}
        except KeyError as exc:
            raise MoedgeError(f"{graph.file} needs input {exc}, which no earlier stage provides") from None
        outs = self.session(graph).run(graph.output_names, feeds)
        return dict(zip(graph.output_names, outs, strict=True))

    def empty_cache(self, batch: int) -> KVCache:
        """A zero-length cache for ``batch`` sequences."""
        return empty_cache(batch, self.num_layers, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        input_ids: np.ndarray,
        *,
        past: KVCache | None = None,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        trace: RoutingTrace | None = None,
    ) -> tuple[np.ndarray, KVCache]:
        """Logits for ``input_ids`` (batch x seq) after ``past``; returns the extended cache."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.size == 0:
            raise MoedgeError(
                f"input_ids must be a non-empty (batch, sequence) array, got shape {input_ids.shape}"
            )
        vocab = int(self.manifest.model.get("vocab_size") or 0)
        if vocab and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise MoedgeError(f"token id out of range: ids must lie in [0, {vocab})")
        past = past if past is not None else self.empty_cache(input_ids.shape[0])
        values = step_inputs(input_ids, past[0].shape[2], attention_mask, position_ids)
        for i in range(self.num_layers):
            values[f"past_key_values.{i}.key"] = past[2 * i]
            values[f"past_key_values.{i}.value"] = past[2 * i + 1]
        values[HIDDEN] = self._run(self.manifest.embedding, values)[HIDDEN]
        present: KVCache = []
        for layer in self.manifest.layers:
            outs = self._run(layer.stage, values)
            present += [outs[f"present.{layer.index}.key"], outs[f"present.{layer.index}.value"]]
            if layer.moe is None:
                values[HIDDEN] = outs[HIDDEN_OUT]
                continue
            x = outs[MOE_INPUT]
            chosen, weights = route(outs[ROUTER_LOGITS], layer.moe.gating)
            if trace is not None:
                trace.chosen[layer.index] = chosen
                trace.weights[layer.index] = weights
                trace.logits[layer.index] = outs[ROUTER_LOGITS]
            routed = np.zeros_like(x)
            for e in np.unique(chosen):
                token, slot = np.nonzero(chosen == e)
                expert = layer.moe.experts[int(e)]
                y = self._run(expert, {EXPERT_INPUT: np.ascontiguousarray(x[token])})["y"]
                routed[token] += y * weights[token, slot, None]
            if layer.moe.gating.shared_expert:
                routed = routed + outs[SHARED_OUTPUT]
            residual = outs[RESIDUAL]
            values[HIDDEN] = residual + routed.reshape(residual.shape)
        logits = self._run(self.manifest.head, values)[LOGITS]
        return logits, present

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Greedy continuation of one prompt with the KV cache."""
        return generate_greedy(
            self.forward,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            on_token=on_token,
        )
