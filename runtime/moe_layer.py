"""One MoE layer of a bundle as the runtime sees it, and the executors that run its experts.

A :class:`MoeLayer` owns everything the model decides about a layer: its gating rule, its router
(for the speculative gate of the layer before it), which tokens go to which expert, and the weighted
combine in expert order. *Where* the chosen experts run is not its business: it hands the
:class:`Routing` to an :class:`ExpertExecutor`, which returns each expert's output. The reference
executor runs every expert in its CPU session; the cached runtime's executor
(``moedge.runtime.expert_executor``) asks a scheduler and runs hits and misses on two devices. Both get
the same inputs and combine the same way, so the output does not depend on the executor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.manifest import EXPERT_INPUT, EXPERT_OUTPUT, GraphSpec, MoeSpec
from moedge.runtime.backends.base import Backend
from moedge.runtime.gating import route


@dataclass(frozen=True)
class Routing:
    """One forward call's routing at one layer: chosen experts (tokens x top_k, best first) and weights."""

    chosen: np.ndarray
    weights: np.ndarray

    def counts(self) -> dict[int, int]:
        """Chosen expert -> number of tokens routed to it, in ascending expert order."""
        experts, counts = np.unique(self.chosen, return_counts=True)
        return {int(e): int(n) for e, n in zip(experts, counts, strict=True)}

    def rows(self, x: np.ndarray, expert: int) -> np.ndarray:
        """The rows of ``x`` (tokens x hidden) routed to ``expert``, in token order: an expert's input."""
        return routed_rows(x, self.chosen, expert)


def routed_rows(x: np.ndarray, chosen: np.ndarray, expert: int) -> np.ndarray:
    """The rows of ``x`` (tokens x hidden) whose choices include ``expert``, in token order."""
    return np.ascontiguousarray(x[np.nonzero(chosen == expert)[0]])


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


class ExpertExecutor(Protocol):
    """Runs a layer's chosen experts somewhere and returns each one's output (expert -> tokens x hidden)."""

    @property
    def wants_candidates(self) -> bool:
        """Whether :meth:`run` uses the next layer's speculative candidates (a prefetching executor)."""
        ...

    def run(
        self, layer: MoeLayer, x: np.ndarray, routing: Routing, candidates: np.ndarray | None
    ) -> dict[int, np.ndarray]:
        """Every expert in ``routing`` on its routed rows of ``x``; ``candidates`` are the next MoE
        layer's likely experts (tokens x candidates, best first), when the executor wants them."""
        ...


class MoeLayer:
    """An MoE layer of a bundle: gating, router, expert graphs, and the combine."""

    def __init__(self, folder: Path, index: int, spec: MoeSpec) -> None:
        self.folder = folder
        self.index = index
        self.spec = spec
        self.next: MoeLayer | None = None  # the next MoE layer (its router is the speculative gate)
        self._router: np.ndarray | None = None

    @property
    def num_experts(self) -> int:
        """How many routed experts the layer has."""
        return self.spec.num_experts

    def expert_graph(self, expert: int) -> GraphSpec:
        """The graph of one routed expert."""
        if not 0 <= expert < self.spec.num_experts:
            raise MoedgeError(f"layer {self.index} has no expert {expert} (it has {self.spec.num_experts})")
        return self.spec.experts[expert]

    def router_weight(self) -> np.ndarray | None:
        """The router weight (experts x hidden), when the bundle carries it (loaded once)."""
        if self._router is None and self.spec.router is not None:
            self._router = load_router(self.folder, self.spec)
        return self._router

    def route(self, router_logits: np.ndarray) -> Routing:
        """The model's gating rule on this layer's router logits."""
        chosen, weights = route(router_logits, self.spec.gating)
        return Routing(chosen, weights)

    def speculate(self, x: np.ndarray, candidates: int) -> np.ndarray | None:
        """The next MoE layer's likely experts (tokens x candidates, best first): its router applied to
        this layer's MoE input ``x``; None for the last MoE layer or a bundle without routers."""
        weight = None if self.next is None else self.next.router_weight()
        if weight is None:
            return None
        scores = x @ weight.T
        return np.argsort(-scores, axis=-1, kind="stable")[:, : min(candidates, weight.shape[0])]

    def combine(self, x: np.ndarray, routing: Routing, outputs: dict[int, np.ndarray]) -> np.ndarray:
        """The routed output (tokens x hidden) from every chosen expert's output, in expert order."""
        missing = sorted(set(routing.counts()) - set(outputs))
        if missing:
            raise MoedgeError(f"layer {self.index}: the executor returned no output for experts {missing}")
        return combine(x, routing.chosen, routing.weights, outputs)


def run_expert_graph(backend: Backend, folder: Path, graph: GraphSpec, x: np.ndarray) -> np.ndarray:
    """One expert graph on its routed rows, on ``backend``."""
    return backend.runner(folder, graph).infer({EXPERT_INPUT: np.ascontiguousarray(x)})[EXPERT_OUTPUT]


class ReferenceExecutor:
    """Every chosen expert in its session on one backend (the CPU), one after another."""

    wants_candidates = False

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def run(
        self, layer: MoeLayer, x: np.ndarray, routing: Routing, candidates: np.ndarray | None
    ) -> dict[int, np.ndarray]:
        """Each chosen expert on its routed rows."""
        return {
            e: run_expert_graph(self.backend, layer.folder, layer.expert_graph(e), routing.rows(x, e))
            for e in routing.counts()
        }


def load_router(folder: Path, spec: MoeSpec) -> np.ndarray:
    """A layer's router weight ``.npy`` (no pickles), checked to be float (experts x hidden)."""
    assert spec.router is not None
    path = folder / spec.router
    weight = read_npy(path, "router weight")
    if weight.ndim != 2 or weight.shape[0] != spec.num_experts or weight.dtype.kind != "f":
        raise MoedgeError(
            f"bundle file {path.name} must hold a float ({spec.num_experts} experts x hidden) router weight, "
            f"got {weight.dtype} {weight.shape}: re-split the bundle with moedge split"
        )
    return weight


def read_npy(path: Path, what: str) -> np.ndarray:
    """A bundle's ``.npy`` file (no pickles), or one error naming the file and ``what`` it should hold."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MoedgeError(f"bundle file {path.name} is not a readable .npy {what} ({exc})") from None
