"""The reference orchestrator: run a bundle in ONNX Runtime CPU sessions with numpy routing.

Per step: embedding stage, then per layer the stage graph, the gating rule on its router logits, each
chosen expert on its routed tokens, the weighted combine in expert order, and the residual add; then
the head. It is the exactness reference the cached CPU/GPU runtime is measured against. numpy and
onnxruntime only (no torch, no transformers).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moedge._errors import MoedgeError
from moedge.manifest import (
    EXPERT_INPUT,
    EXPERT_OUTPUT,
    HIDDEN,
    HIDDEN_OUT,
    LOGITS,
    MOE_INPUT,
    RESIDUAL,
    ROUTER_LOGITS,
    SHARED_OUTPUT,
    GraphSpec,
    Manifest,
    MoeSpec,
    read_manifest,
)
from moedge.runtime.backends.base import Backend
from moedge.runtime.backends.ort_cpu import OrtCpuBackend
from moedge.runtime.gating import route
from moedge.runtime.ort_session import KVCache, empty_cache, generate_greedy, step_inputs

log = logging.getLogger(__name__)


@dataclass
class RoutingTrace:
    """Which experts each layer chose in one forward call: layer -> (tokens x top_k) indices."""

    chosen: dict[int, np.ndarray] = field(default_factory=dict)
    weights: dict[int, np.ndarray] = field(default_factory=dict)
    logits: dict[int, np.ndarray] = field(default_factory=dict)
    # next MoE layer -> (tokens x candidates): its router applied to this layer's MoE input, best first
    speculative: dict[int, np.ndarray] = field(default_factory=dict)


ExpertRun = Callable[[int, np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]
"""(layer, moe_input, chosen, weights, speculative next-layer candidates) -> routed output (tokens x hidden)."""


class BundleRunner:
    """A bundle folder as ORT sessions (created on first use) with the model's exact gating.

    Stage graphs run on ``stage_backend`` (default: ORT on the CPU with ``providers``); experts run
    through ``run_experts``, which a cached runtime replaces (``moedge.runtime.Generator``).
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
        stage_backend: Backend | None = None,
    ) -> None:
        self.folder = Path(bundle)
        self.manifest: Manifest = read_manifest(self.folder, verify=verify)
        self.cpu = OrtCpuBackend(
            intra_op_threads=intra_op_threads,
            optimize=optimize,
            spinning=spinning,
            providers=providers,
            shared_pool=shared_pool,
        )
        self.stage_backend: Backend = stage_backend or self.cpu
        model = self.manifest.model
        self.num_layers = len(self.manifest.layers)
        self.num_kv_heads = int(model["num_kv_heads"])
        self.head_dim = int(model["head_dim"])
        self.eos_token_id = model.get("eos_token_id")
        moe = [layer for layer in self.manifest.layers if layer.moe is not None]
        self.next_moe = {a.index: b.index for a, b in itertools.pairwise(moe)}
        self._routers: dict[int, np.ndarray | None] = {}
        self.run_experts: ExpertRun = self.reference_experts
        self.speculative_candidates = 4
        self.before_stage: Callable[[int], None] | None = None  # a scheduler's clock
        self.speculation = False  # compute next-layer candidates every step (a prefetching runner)

    def router_weight(self, layer: int) -> np.ndarray | None:
        """The router weight (experts x hidden) of an MoE layer, when the bundle carries it."""
        if layer not in self._routers:
            spec = self.manifest.layers[layer].moe
            has_router = spec is not None and spec.router is not None
            self._routers[layer] = (
                _load_router(self.folder, spec) if spec is not None and has_router else None
            )
        return self._routers[layer]

    def speculate(self, layer: int, x: np.ndarray) -> np.ndarray | None:
        """The next MoE layer's likely experts (tokens x candidates, best first) from this layer's MoE input."""
        nxt = self.next_moe.get(layer)
        weight = None if nxt is None else self.router_weight(nxt)
        if weight is None:
            return None
        scores = x @ weight.T
        k = min(self.speculative_candidates, weight.shape[0])
        return np.argsort(-scores, axis=-1, kind="stable")[:, :k]

    def expert_graph(self, layer: int, expert: int) -> GraphSpec:
        """The graph of one routed expert."""
        spec = self.manifest.layers[layer].moe
        assert spec is not None
        return spec.experts[expert]

    def run_expert(
        self, layer: int, expert: int, x: np.ndarray, backend: Backend | None = None
    ) -> np.ndarray:
        """One routed expert on its tokens, on ``backend`` (default: the CPU)."""
        runner = (backend or self.cpu).runner(self.folder, self.expert_graph(layer, expert))
        return runner.infer({EXPERT_INPUT: np.ascontiguousarray(x)})[EXPERT_OUTPUT]

    def reference_experts(
        self,
        layer: int,
        x: np.ndarray,
        chosen: np.ndarray,
        weights: np.ndarray,
        speculative: np.ndarray | None,
    ) -> np.ndarray:
        """Every chosen expert on its routed tokens (CPU), combined in expert order."""
        outputs = {
            int(e): self.run_expert(layer, int(e), routed_rows(x, chosen, e)) for e in np.unique(chosen)
        }
        return combine(x, chosen, weights, outputs)

    def _run(self, graph: GraphSpec, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            feeds = {name: values[name] for name in graph.input_names}
        except KeyError as exc:
            raise MoedgeError(f"{graph.file} needs input {exc}, which no earlier stage provides") from None
        return self.stage_backend.runner(self.folder, graph).infer(feeds)

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
        values.update(self._run(self.manifest.embedding, values))  # the hidden state and shared tensors
        present: KVCache = []
        for layer in self.manifest.layers:
            if self.before_stage is not None:
                self.before_stage(layer.index)
            outs = self._run(layer.stage, values)
            present += [outs[f"present.{layer.index}.key"], outs[f"present.{layer.index}.value"]]
            if layer.moe is None:
                values[HIDDEN] = outs[HIDDEN_OUT]
                continue
            x = outs[MOE_INPUT]
            chosen, weights = route(outs[ROUTER_LOGITS], layer.moe.gating)
            speculative = self.speculate(layer.index, x) if self.speculation or trace is not None else None
            if trace is not None:
                trace.chosen[layer.index] = chosen
                trace.weights[layer.index] = weights
                trace.logits[layer.index] = outs[ROUTER_LOGITS]
                if speculative is not None:
                    trace.speculative[self.next_moe[layer.index]] = speculative
            routed = self.run_experts(layer.index, x, chosen, weights, speculative)
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


def _load_router(folder: Path, spec: MoeSpec) -> np.ndarray:
    """A layer's router weight ``.npy`` (no pickles), checked to be float (experts x hidden)."""
    assert spec.router is not None
    path = folder / spec.router
    try:
        weight = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MoedgeError(f"bundle file {path.name} is not a readable .npy router weight ({exc})") from None
    if weight.ndim != 2 or weight.shape[0] != spec.num_experts or weight.dtype.kind != "f":
        raise MoedgeError(
            f"bundle file {path.name} must hold a float ({spec.num_experts} experts x hidden) router weight, "
            f"got {weight.dtype} {weight.shape}: re-split the bundle with moedge split"
        )
    return weight


def routed_rows(x: np.ndarray, chosen: np.ndarray, expert: int) -> np.ndarray:
    """The rows of ``x`` (tokens x hidden) routed to ``expert``, in token order: an expert's input."""
    return x[np.nonzero(chosen == expert)[0]]


def combine(
    x: np.ndarray, chosen: np.ndarray, weights: np.ndarray, outputs: dict[int, np.ndarray]
) -> np.ndarray:
    """The routed output: each expert's result times its routing weight, added in expert order.

    The order is fixed so every runner, wherever each expert ran, gives bit-identical sums.
    """
    routed = np.zeros_like(x)
    for e in sorted(outputs):
        token, slot = np.nonzero(chosen == e)
        routed[token] += outputs[e] * weights[token, slot, None]
    return routed
