"""The cached runtime's expert executor: a scheduler decides, two backends run, one combine.

For each MoE layer the executor asks the :class:`ExpertScheduler` where each chosen expert runs (a
GPU hit, a miss copied in, or a miss run on the CPU), makes residency follow the scheduler's cache
(``admit``/``evict``: a copy in the background on a real GPU, at once on a modeled one), and runs the
GPU's experts in a worker thread while the CPU runs the rest (ONNX Runtime releases the GIL). The
layer (:class:`MoeLayer`) combines the outputs in expert order, so the result does not depend on where
an expert ran.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from moedge.runtime.backends.base import Backend
from moedge.runtime.cache import ExpertKey
from moedge.runtime.moe_layer import MoeLayer, Routing, run_expert_graph
from moedge.runtime.scheduler import ExpertScheduler

Recorder = Callable[[int, dict[int, int], dict[int, int]], None]
"""(layer, expert -> tokens routed, expert -> tokens computed): what one layer's dispatch did."""


class CachedExecutor:
    """Runs a layer's chosen experts where ``scheduler`` places them: ``gpu`` for hits, ``cpu`` otherwise."""

    def __init__(
        self,
        folder: Path,
        graphs: Callable[[ExpertKey], Any],
        cpu: Backend,
        gpu: Backend,
        *,
        parallel: bool = True,
        record: Recorder | None = None,
    ) -> None:
        self.folder = folder
        self.graphs = graphs  # (layer, expert) -> its GraphSpec
        self.cpu = cpu
        self.gpu = gpu
        self.record = record
        self.scheduler: ExpertScheduler | None = None
        self._loading: dict[ExpertKey, Future[None]] = {}
        self._loader = None if gpu.modeled else ThreadPoolExecutor(1, thread_name_prefix="moedge-copy")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moedge-gpu") if parallel else None

    def attach(self, scheduler: ExpertScheduler) -> None:
        """The scheduler whose decisions this executor follows (made with :meth:`admit`/:meth:`evict`)."""
        self.scheduler = scheduler

    @property
    def wants_candidates(self) -> bool:
        """Whether the scheduler prefetches the next layer's likely experts."""
        return self.scheduler is not None and self.scheduler.policy.prefetch > 0

    # --- residency (the scheduler's cache calls these) ---------------------------------------------
    def admit(self, key: ExpertKey) -> None:
        """Make an expert resident: at once on a modeled GPU, in the background on a real one (a copy
        that overlaps compute; the expert's first GPU run waits for it)."""
        runner = self.gpu.runner(self.folder, self.graphs(key))
        if self._loader is None:
            runner.activate()
        else:
            self._loading[key] = self._loader.submit(runner.activate)

    def evict(self, key: ExpertKey) -> None:
        """Release an expert's device copy (after its pending copy, if any, has landed)."""
        pending = self._loading.pop(key, None)
        if pending is not None:
            pending.result()
        self.gpu.runner(self.folder, self.graphs(key)).release()

    # --- one layer ---------------------------------------------------------------------------------
    def run(
        self, layer: MoeLayer, x: np.ndarray, routing: Routing, candidates: np.ndarray | None
    ) -> dict[int, np.ndarray]:
        """Dispatch the layer's experts through the scheduler and run them on both devices."""
        assert self.scheduler is not None, "CachedExecutor.attach(scheduler) first"
        routed = routing.counts()
        nxt = None
        if candidates is not None:
            width = max(self.scheduler.policy.prefetch, 1)
            votes = np.bincount(candidates[:, :width].ravel(), minlength=1)
            nxt = [int(e) for e in np.argsort(-votes, kind="stable") if votes[e] > 0]
        where = self.scheduler.dispatch(layer.index, routed, nxt)
        computed: dict[int, int] = {}

        def run(experts: list[int], backend: Backend, on_gpu: bool) -> dict[int, np.ndarray]:
            out = {}
            for e in experts:
                pending = self._loading.pop((layer.index, e), None) if on_gpu else None
                if pending is not None:
                    pending.result()  # its copy (a prefetch or this miss's transfer) must have landed
                rows = routing.rows(x, e)
                out[e] = run_expert_graph(backend, self.folder, layer.expert_graph(e), rows)
                computed[e] = computed.get(e, 0) + len(rows)
            return out

        on_gpu = [e for e in routed if where[e] == "gpu"]
        on_cpu = [e for e in routed if where[e] == "cpu"]
        if self._pool is not None and on_gpu and on_cpu:
            future = self._pool.submit(run, on_gpu, self.gpu, True)
            outputs = run(on_cpu, self.cpu, False)
            outputs.update(future.result())
        else:
            outputs = run(on_gpu, self.gpu, True)
            outputs.update(run(on_cpu, self.cpu, False))
        if self.record is not None:
            self.record(layer.index, routed, computed)
        return outputs

    def close(self) -> None:
        """Stop the worker threads."""
        for pool in (self._pool, self._loader):
            if pool is not None:
                pool.shutdown()
