"""The reference orchestrator: run a bundle in ONNX Runtime CPU sessions with numpy routing.

Per step: embedding stage, then per layer the stage graph, the gating rule on its router logits, each
chosen expert on its routed tokens, the weighted combine in expert order, and the residual add; then
the head. With its default executor it is the exactness reference the cached CPU/GPU runtime
(``moedge.runtime.Generator``) is measured against; the generator runs the same object with its own
executor. numpy and onnxruntime only (no torch, no transformers).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.manifest import (
    COS_CACHE,
    HIDDEN,
    HIDDEN_OUT,
    LOGITS,
    MOE_INPUT,
    RESIDUAL,
    ROUTER_LOGITS,
    SEQLENS_K,
    SHARED_OUTPUT,
    SIN_CACHE,
    TARGET_ORT_CPU,
    TOTAL_SEQUENCE_LENGTH,
    GraphSpec,
    Manifest,
    StageRun,
    past_names,
    present_names,
    read_manifest,
)
from moedge.runtime.backends.base import Backend
from moedge.runtime.backends.ort_cpu import OrtCpuBackend
from moedge.runtime.moe_layer import (
    ExpertExecutor,
    MoeLayer,
    ReferenceExecutor,
    Routing,
    read_npy,
    run_expert_graph,
)
from moedge.runtime.ort_session import KVCache, empty_cache, step_inputs
from moedge.runtime.static_cache import InPlace, StaticCache, initial_capacity, left_padded, right_padded

log = logging.getLogger(__name__)


@dataclass
class RoutingTrace:
    """Which experts each layer chose in one forward call: layer -> (tokens x top_k) indices."""

    chosen: dict[int, np.ndarray] = field(default_factory=dict)
    weights: dict[int, np.ndarray] = field(default_factory=dict)
    logits: dict[int, np.ndarray] = field(default_factory=dict)
    # next MoE layer -> (tokens x candidates): its router applied to this layer's MoE input, best first
    speculative: dict[int, np.ndarray] = field(default_factory=dict)

    def record(
        self, layer: MoeLayer, routing: Routing, logits: np.ndarray, candidates: np.ndarray | None
    ) -> None:
        """Keep one MoE layer's routing (and its speculative gate for the next MoE layer)."""
        self.chosen[layer.index] = routing.chosen
        self.weights[layer.index] = routing.weights
        self.logits[layer.index] = logits
        if candidates is not None and layer.next is not None:
            self.speculative[layer.next.index] = candidates


class BundleRunner:
    """A bundle folder as ORT sessions (created on first use) with the model's exact gating.

    ``manifest`` is the bundle's, already read (default: read and checked here). Stage graphs run on
    ``stage_backend`` (default: ``cpu``, ORT on the CPU with ``providers``); each MoE layer
    (:class:`MoeLayer`) hands its routing to ``executor`` (default: every expert on ``cpu``,
    :class:`ReferenceExecutor`; the cached runtime passes its own). ``on_stage`` is called with a
    layer's index before its stage graph runs (a scheduler's clock).

    A bundle split with ``--experts-in-graph`` routes and runs its experts inside its stage graphs: its
    MoE layers run like dense ones, and what needs separate expert graphs (another ``executor``, a
    routing ``trace``, ``run_expert``) is refused with one line.
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        verify: bool = True,
        optimize: bool = True,
        spinning: bool = False,
        shared_pool: bool = False,
        manifest: Manifest | None = None,
        cpu: Backend | None = None,
        stage_backend: Backend | None = None,
        executor: ExpertExecutor | None = None,
        on_stage: Callable[[int], None] | None = None,
        speculative_candidates: int = 4,
    ) -> None:
        self.folder = Path(bundle)
        self.manifest: Manifest = manifest or read_manifest(self.folder, verify=verify)
        self.cpu: Backend = cpu or OrtCpuBackend(
            intra_op_threads=intra_op_threads,
            optimize=optimize,
            spinning=spinning,
            providers=providers,
            shared_pool=shared_pool,
        )
        self.stage_backend: Backend = stage_backend or self.cpu
        if executor is not None:
            self.manifest.require_separate_experts(
                "an expert executor (expert cache, GPU experts)", self.folder
            )
        self.executor: ExpertExecutor = executor or ReferenceExecutor(self.cpu)
        self.on_stage = on_stage
        model = self.manifest.model
        self.num_layers = len(self.manifest.layers)
        self.num_kv_heads = int(model["num_kv_heads"])
        self.head_dim = int(model["head_dim"])
        self.eos_token_id = model.get("eos_token_id")
        self.moe_layers: dict[int, MoeLayer] = {  # the MoE layers the runner routes (separate experts)
            layer.index: MoeLayer(self.folder, layer.index, layer.moe)
            for layer in self.manifest.layers
            if layer.moe is not None and not layer.moe.experts_in_graph
        }
        for a, b in itertools.pairwise(self.moe_layers.values()):
            a.next = b
        self.speculative_candidates = speculative_candidates
        self.context = int(model.get("max_position_embeddings") or 0)
        self._rotary_tables: tuple[np.ndarray, np.ndarray] | None = None
        self._runs = self.manifest.stage_runs()

    @property
    def uses_cache(self) -> bool:
        """Always True: a bundle's stages take and return the KV cache."""
        return True

    def moe_layer(self, layer: int) -> MoeLayer:
        """The MoE layer at decoder index ``layer``."""
        if layer not in self.moe_layers:
            self.manifest.require_separate_experts(f"layer {layer}'s expert graphs", self.folder)
            raise MoedgeError(f"layer {layer} of {self.folder} is not an MoE layer")
        return self.moe_layers[layer]

    def run_expert(
        self, layer: int, expert: int, x: np.ndarray, backend: Backend | None = None
    ) -> np.ndarray:
        """One routed expert on its tokens, on ``backend`` (default: the CPU)."""
        moe = self.moe_layer(layer)
        return run_expert_graph(backend or self.cpu, self.folder, moe.expert_graph(expert), x)

    def _run(
        self, graph: GraphSpec, values: dict[str, np.ndarray], in_place: Sequence[InPlace] = ()
    ) -> dict[str, np.ndarray]:
        bound = {b.input for b in in_place}
        try:
            feeds = {name: values[name] for name in graph.input_names if name not in bound}
        except KeyError as exc:
            raise MoedgeError(f"{graph.file} needs input {exc}, which no earlier stage provides") from None
        runner = self.stage_backend.runner(self.folder, graph)
        return runner.infer_in_place(feeds, in_place) if in_place else runner.infer(feeds)

    def empty_cache(self, batch: int) -> KVCache:
        """A zero-length cache for ``batch`` sequences."""
        return empty_cache(batch, self.num_layers, self.num_kv_heads, self.head_dim)

    def _check_ids(self, input_ids: np.ndarray) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.size == 0:
            raise MoedgeError(
                f"input_ids must be a non-empty (batch, sequence) array, got shape {input_ids.shape}"
            )
        vocab = int(self.manifest.model.get("vocab_size") or 0)
        if vocab and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise MoedgeError(f"token id out of range: ids must lie in [0, {vocab})")
        return input_ids

    def forward(
        self,
        input_ids: np.ndarray,
        *,
        past: Any = None,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        trace: RoutingTrace | None = None,
        last_only: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """Logits for ``input_ids`` (batch x seq) after ``past``; returns the extended cache.

        Rows are left-padded (``attention_mask``). The cache is a list of per-layer key and value arrays
        (a tensorrt-target bundle) or a :class:`StaticCache` updated in place (an ort-cpu bundle). With
        ``last_only`` the head runs on each row's last position only (batch x 1 x vocab logits).
        """
        input_ids = self._check_ids(input_ids)
        if trace is not None:
            self.manifest.require_separate_experts("a routing trace", self.folder)
        if self.manifest.stage_target == TARGET_ORT_CPU:
            return self._forward_static(input_ids, past, attention_mask, trace, last_only)
        past = past if past is not None else self.empty_cache(input_ids.shape[0])
        values = step_inputs(input_ids, past[0].shape[2], attention_mask, position_ids)
        for i in range(self.num_layers):
            values[f"past_key_values.{i}.key"] = past[2 * i]
            values[f"past_key_values.{i}.value"] = past[2 * i + 1]
        values.update(self._run(self.manifest.embedding, values))  # the hidden state and shared tensors
        present: KVCache = []
        for run in self._runs:
            self._clock(run)
            outs = self._run(run.stage, values)
            for layer in run.layers:
                present += [outs[f"present.{layer.index}.key"], outs[f"present.{layer.index}.value"]]
            values[HIDDEN] = self._stage_output(run, outs, trace)
        if last_only:
            values[HIDDEN] = values[HIDDEN][:, -1:]
        logits = self._run(self.manifest.head, values)[LOGITS]
        return logits, present

    def _clock(self, run: StageRun) -> None:
        """Tell ``on_stage`` about each layer the stage runs, before it runs."""
        if self.on_stage is not None:
            for layer in run.layers:
                self.on_stage(layer.index)

    def _stage_output(
        self, run: StageRun, outs: dict[str, np.ndarray], trace: RoutingTrace | None
    ) -> np.ndarray:
        """The hidden state after the stage's last layer (its MoE part too, for an MoE layer)."""
        last = run.last
        if last.moe is None or last.moe.experts_in_graph:
            return outs[HIDDEN_OUT]
        return self._moe(self.moe_layers[last.index], outs, trace)

    def _forward_static(
        self,
        input_ids: np.ndarray,
        past: StaticCache | None,
        attention_mask: np.ndarray | None,
        trace: RoutingTrace | None,
        last_only: bool,
    ) -> tuple[np.ndarray, StaticCache]:
        """An ort-cpu bundle's step: rows right-padded for GroupQueryAttention, the KV cache in place."""
        rows, seq = input_ids.shape
        ids, counts = right_padded(input_ids, attention_mask)
        if past is None:
            past = StaticCache(rows, self.num_layers, self.num_kv_heads, self.head_dim, initial_capacity(seq))
        elif seq > 1 and rows > 1:
            raise MoedgeError("an ort-cpu bundle continues a batch one token per row at a time")
        if past.rows != rows:
            raise MoedgeError(f"the cache holds {past.rows} rows, the step has {rows}")
        total = past.lengths + counts
        past.reserve(int(total.max()), self.context)
        values = self._static_inputs(ids, past.lengths, total)
        values.update(self._run(self.manifest.embedding, values))
        for run in self._runs:
            self._clock(run)
            buffers = [
                b
                for layer in run.layers
                for b in past.bound(layer.index, (*past_names(layer.index), *present_names(layer.index)))
            ]
            outs = self._run(run.stage, values, buffers)
            values[HIDDEN] = self._stage_output(run, outs, trace)
        past.lengths = total
        if last_only:  # each row's last token sits at counts - 1 (right-padded)
            values[HIDDEN] = values[HIDDEN][np.arange(rows), counts - 1][:, None]
            return self._run(self.manifest.head, values)[LOGITS], past
        logits = self._run(self.manifest.head, values)[LOGITS]
        return left_padded(logits, counts), past

    def _static_inputs(self, ids: np.ndarray, before: np.ndarray, total: np.ndarray) -> dict[str, np.ndarray]:
        """What the embedding and the fused stages read besides the hidden state and the KV buffers."""
        rows, seq = ids.shape
        longest = int(total.max())
        values = step_inputs(
            ids, longest - seq, None, before[:, None] + np.arange(seq)
        )  # mask: (rows, longest)
        shape = (rows, self.num_kv_heads, longest - seq, self.head_dim)
        for name in self.manifest.embedding.input_names:  # it reads a past's shape, never its values
            if name.startswith("past_key_values."):
                values[name] = np.zeros(shape, np.float32)
        values[SEQLENS_K] = (total - 1).astype(np.int32)
        values[TOTAL_SEQUENCE_LENGTH] = np.asarray(longest, dtype=np.int32)
        values[COS_CACHE], values[SIN_CACHE] = self._rotary()
        return values

    def _rotary(self) -> tuple[np.ndarray, np.ndarray]:
        """The bundle's cos/sin tables (read once, checked)."""
        if self._rotary_tables is None:
            assert self.manifest.rotary is not None  # read_manifest requires it for ort-cpu
            path = self.folder / self.manifest.rotary
            table = read_npy(path, "cos/sin table")
            if table.ndim != 3 or table.shape[0] != 2 or table.dtype != np.float32:
                raise MoedgeError(
                    f"bundle file {path.name} must hold float32 (2, positions, head_dim / 2) cos/sin tables, "
                    f"got {table.dtype} {table.shape}: re-split the bundle with moedge split --target ort-cpu"
                )
            self._rotary_tables = (np.ascontiguousarray(table[0]), np.ascontiguousarray(table[1]))
        return self._rotary_tables

    def _moe(self, moe: MoeLayer, outs: dict[str, np.ndarray], trace: RoutingTrace | None) -> np.ndarray:
        """An MoE layer's output hidden state: residual + routed experts (+ the shared expert)."""
        x = outs[MOE_INPUT]
        routing = moe.route(outs[ROUTER_LOGITS])
        wanted = self.executor.wants_candidates or trace is not None
        candidates = moe.speculate(x, self.speculative_candidates) if wanted else None
        if trace is not None:
            trace.record(moe, routing, outs[ROUTER_LOGITS], candidates)
        routed = moe.combine(x, routing, self.executor.run(moe, x, routing, candidates))
        if moe.spec.gating.shared_expert:
            routed = routed + outs[SHARED_OUTPUT]
        residual = outs[RESIDUAL]
        return residual + routed.reshape(residual.shape)
