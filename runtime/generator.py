"""Generation on a CPU+GPU pair with a byte-budgeted GPU expert cache: the deployment API.

``Generator`` loads a bundle, places stage graphs on the GPU backend and experts where the policy
and the latency predictor say (``moedge.runtime.scheduler``, ``policies``, ``predictor``), and generates with a KV cache: greedy
or sampled (seeded), streaming tokens, stop tokens, several prompts. Per layer, GPU hits and CPU
misses run in parallel threads (ONNX Runtime releases the GIL) and are combined in expert order, so
the output does not depend on where an expert ran. With the ``simulated`` backend everything executes
on the CPU and the GPU side is modeled on a hardware profile; modeled figures are labelled so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError
from moedge.arch import get_by_name
from moedge.runtime.backends.base import Backend, make_backend
from moedge.runtime.backends.simulated_gpu import SimulatedGpuBackend
from moedge.runtime.bundle_runner import BundleRunner, combine, routed_rows
from moedge.runtime.cache import ExpertKey
from moedge.runtime.costs import ModelCosts, parse_budget
from moedge.runtime.placement import read_plan_file
from moedge.runtime.policies import get_policy
from moedge.runtime.predictor import LatencyPredictor, fit_cpu_timings
from moedge.runtime.profiles import HardwareProfile, load_profile
from moedge.runtime.routing import RoutingStats, read_routing
from moedge.runtime.scheduler import ExpertScheduler

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One prompt's result."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None = None
    stopped_by: str = "length"  # length | stop | eos | context | interrupt


@dataclass
class RunMetrics:
    """What a run measured (wall clock) and modeled (the GPU side, on a profile)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    token_latencies: list[float] = field(default_factory=list)
    computed: list[dict[ExpertKey, int]] = field(default_factory=list)  # per step: expert -> tokens run
    routed: list[dict[ExpertKey, int]] = field(default_factory=list)  # per step: expert -> tokens routed
    interrupted: bool = False

    def summary(self, scheduler: ExpertScheduler | None, backend: Backend) -> dict[str, Any]:
        """Everything ``moedge run`` prints and ``--metrics-json`` writes."""
        lat = np.asarray(self.token_latencies or [0.0]) * 1e3
        out: dict[str, Any] = {
            "backend": backend.name,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_per_s": self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else None,
            "decode_tokens": self.decode_tokens,
            "decode_tokens_per_s": self.decode_tokens / self.decode_seconds if self.decode_seconds else None,
            "token_latency_ms": {
                "p50": float(np.percentile(lat, 50)),
                "p90": float(np.percentile(lat, 90)),
                "p99": float(np.percentile(lat, 99)),
                "std": float(lat.std()),
            },
            "interrupted": self.interrupted,
        }
        if scheduler is not None:
            model = scheduler.summary()
            model["device_bytes"] = scheduler.device_bytes(self.prompt_tokens + self.decode_tokens)
            out["gpu"] = model
        if isinstance(backend, SimulatedGpuBackend):
            out["simulated_device_peak_bytes"] = backend.peak
        return out


def _sample(
    logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float
) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    if top_k > 0:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


class Generator:
    """A bundle ready to generate, with its backends, expert cache and metrics."""

    def __init__(
        self,
        bundle: str | Path,
        *,
        backend: str = "simulated",
        policy: str = "haq",
        gpu_budget: str | int | float | None = "25%",
        profile: str | HardwareProfile = "rtx4090-pcie4",
        plan: str | Path | None = None,
        routing: str | Path | None = None,
        intra_op_threads: int | None = None,
        verify: bool = True,
        cache: bool = True,
        parallel: bool = True,
        shared_pool: bool = False,
        engines: str | Path | None = None,
    ) -> None:
        self.runner = BundleRunner(
            bundle, intra_op_threads=intra_op_threads, verify=verify, shared_pool=shared_pool
        )
        self.manifest = self.runner.manifest
        self.folder = self.runner.folder
        self.profile = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
        self.costs = ModelCosts.from_manifest(self.manifest)
        self.parallel = parallel
        self.engines = engines
        self.tokenizer = self._tokenizer()
        self.context = int(self.manifest.model.get("max_position_embeddings") or 0)
        self.metrics = RunMetrics()
        if backend == "ort-cpu" or not cache or not self.costs.moe_layers:
            self.gpu: Backend = self.runner.cpu
            self.scheduler: ExpertScheduler | None = None
            self.backend_name = "ort-cpu" if backend == "ort-cpu" or not cache else backend
            if backend != "ort-cpu" and cache:
                self.gpu = self._make_gpu(backend, intra_op_threads)
                self.runner.stage_backend = self.gpu
                self._activate_base()
            return
        self.gpu = self._make_gpu(backend, intra_op_threads)
        self.backend_name = backend
        self._loading: dict[ExpertKey, Future[None]] = {}
        self._loader = (
            None if self.gpu.modeled else ThreadPoolExecutor(max_workers=1, thread_name_prefix="moedge-copy")
        )
        self.runner.stage_backend = self.gpu
        self._activate_base()
        stats = self._routing(routing)
        pinned: list[ExpertKey] | None = None
        chosen = get_policy(policy)
        if plan is not None:
            pinned, settings = read_plan_file(plan)
            chosen = replace(chosen, **{k: v for k, v in settings.items() if hasattr(chosen, k)})
        free = self.gpu.free_memory()
        budget = parse_budget(gpu_budget, self.costs, free_device_bytes=free, context=self.context)
        predictor = LatencyPredictor(self.profile, int8=self.costs.int8, cpu_fit=self._cpu_fit())
        self.scheduler = ExpertScheduler(
            self.costs,
            chosen,
            budget,
            self.profile,
            stats=stats,
            plan=pinned,
            predictor=predictor,
            on_admit=self._admit,
            on_evict=self._evict,
        )
        self.runner.run_experts = self._run_experts
        self.runner.before_stage = self.scheduler.run_stage
        self.runner.speculation = chosen.prefetch > 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moedge-gpu") if parallel else None

    # --- set-up ------------------------------------------------------------------------------------
    def _make_gpu(self, backend: str, threads: int | None) -> Backend:
        if backend == "simulated":  # shares the CPU sessions: it executes on the CPU
            return SimulatedGpuBackend(profile=self.profile, cpu=self.runner.cpu)
        if backend == "tensorrt":
            return make_backend(backend, intra_op_threads=threads, engine_dir=self.engines)
        return make_backend(backend, intra_op_threads=threads)

    def _activate_base(self) -> None:
        for graph in [
            self.manifest.embedding,
            *[layer.stage for layer in self.manifest.layers],
            self.manifest.head,
        ]:
            self.gpu.runner(self.folder, graph).activate()

    def _tokenizer(self) -> Any:
        name = self.manifest.tokenizer  # checked by read_manifest: listed, inside the bundle, present
        if not name:
            return None
        from moedge.tokenizer import load_tokenizer

        return load_tokenizer(self.folder / name)

    def _routing(self, routing: str | Path | None) -> RoutingStats | None:
        if routing is not None:
            return read_routing(routing)
        if self.manifest.routing:  # checked by read_manifest: listed, inside the bundle, present
            return read_routing(self.folder / self.manifest.routing)
        return None

    def _cpu_fit(self) -> tuple[float, float] | None:
        """CPU expert timings measured at start-up, when a real GPU runs (a modeled one uses its profile)."""
        if self.gpu.modeled or not self.costs.moe_layers:
            return None
        layer = self.costs.moe_layers[0]
        hidden = int(self.manifest.model.get("hidden_size") or 0)
        timings = []
        for tokens in (1, 16):
            x = np.zeros((tokens, hidden), dtype=np.float32)
            self.runner.run_expert(layer, 0, x)  # warm-up
            start = time.perf_counter()
            for _ in range(5):
                self.runner.run_expert(layer, 0, x)
            timings.append((tokens, (time.perf_counter() - start) / 5))
        return fit_cpu_timings(timings)

    def _gpu_runner(self, key: ExpertKey) -> Any:
        return self.gpu.runner(self.folder, self.runner.expert_graph(*key))

    def _admit(self, key: ExpertKey) -> None:
        """Make an expert resident: at once on a modeled GPU, in the background on a real one (a copy that
        overlaps compute; the expert's first GPU run waits for it)."""
        runner = self._gpu_runner(key)
        if self.gpu.modeled or self._loader is None:
            runner.activate()
        else:
            self._loading[key] = self._loader.submit(runner.activate)

    def _evict(self, key: ExpertKey) -> None:
        pending = self._loading.pop(key, None)
        if pending is not None:
            pending.result()
        self._gpu_runner(key).release()

    # --- one MoE layer -----------------------------------------------------------------------------
    def _run_experts(
        self,
        layer: int,
        x: np.ndarray,
        chosen: np.ndarray,
        weights: np.ndarray,
        speculative: np.ndarray | None,
    ) -> np.ndarray:
        assert self.scheduler is not None
        experts, counts = np.unique(chosen, return_counts=True)
        routed = {int(e): int(n) for e, n in zip(experts, counts, strict=True)}
        nxt = None
        if speculative is not None:
            votes = np.bincount(speculative[:, : max(self.scheduler.policy.prefetch, 1)].ravel(), minlength=1)
            nxt = [int(e) for e in np.argsort(-votes, kind="stable") if votes[e] > 0]
        where = self.scheduler.dispatch(layer, routed, nxt)
        self.metrics.routed[-1].update({(layer, e): n for e, n in routed.items()})
        step = self.metrics.computed[-1]
        tokens = {e: routed_rows(x, chosen, e) for e in routed}

        def run(es: list[int], backend: Backend | None) -> dict[int, np.ndarray]:
            out = {}
            for e in es:
                pending = self._loading.pop((layer, e), None) if backend is not None else None
                if pending is not None:
                    pending.result()  # its copy (a prefetch or this miss's transfer) must have landed
                out[e] = self.runner.run_expert(layer, e, tokens[e], backend)
                step[(layer, e)] = step.get((layer, e), 0) + len(tokens[e])
            return out

        on_gpu = [e for e in routed if where[e] == "gpu"]
        on_cpu = [e for e in routed if where[e] == "cpu"]
        if self._pool is not None and on_gpu and on_cpu:
            future = self._pool.submit(run, on_gpu, self.gpu)
            outputs = run(on_cpu, None)
            outputs.update(future.result())
        else:
            outputs = run(on_gpu, self.gpu)
            outputs.update(run(on_cpu, None))
        return combine(x, chosen, weights, outputs)

    # --- generation --------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text through the bundle's tokenizer, or ids as given)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MoedgeError(f"{self.folder} carries no tokenizer.json: pass token ids instead of text")
            ids = list(self.tokenizer.encode(prompt).ids)
            bos = self.manifest.model.get("bos_token_id")
            arch = get_by_name(str(self.manifest.model.get("architecture")))
            if bos is not None and (not ids or ids[0] != bos) and arch is not None and arch.prepend_bos:
                ids = [int(bos), *ids]
            return ids
        return [int(t) for t in prompt]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (empty without a tokenizer)."""
        return "" if self.tokenizer is None else str(self.tokenizer.decode(list(ids)))

    def forward(
        self,
        ids: np.ndarray,
        past: Any = None,
        mask: np.ndarray | None = None,
        positions: np.ndarray | None = None,
    ) -> tuple[np.ndarray, Any]:
        """One forward step through the cached runtime: logits for ``ids`` (batch x seq) after ``past``.

        Experts run where the scheduler places them (as in :meth:`generate`); the step counts in the
        metrics and the modeled clock. Returns the logits and the extended KV cache.
        """
        ids = np.asarray(ids, dtype=np.int64)
        tokens = int(ids.size)
        context = 0 if past is None else int(past[0].shape[2])
        self.metrics.computed.append({})
        self.metrics.routed.append({})
        if self.scheduler is not None:
            self.scheduler.begin_step(tokens, context, rows=int(ids.shape[0]))
        logits, present = self.runner.forward(ids, past=past, attention_mask=mask, position_ids=positions)
        if self.scheduler is not None:
            self.scheduler.end_step()
        return logits, present

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[int] = (),
        on_token: Callable[[int, int], None] | None = None,
        batch: bool = True,
    ) -> list[Generation]:
        """Continue each prompt (text or ids); ``on_token(prompt_index, token_id)`` streams tokens.

        Several prompts run as one batch (left-padded, one forward pass per step for all of them; a
        prompt that stops leaves the batch) unless ``batch`` is False, which runs them one after
        another. Greedy when ``temperature`` is 0; otherwise sampled with ``top_k``/``top_p`` from
        ``seed``. Generation stops at ``max_new_tokens``, the model's end-of-sequence token, a ``stop``
        token, or the context length. Ctrl-C ends it cleanly: the results so far come back with
        ``stopped_by="interrupt"`` and the metrics say ``interrupted``.
        """
        prompt_list = (
            [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else prompts
        )
        rng = np.random.default_rng(seed)
        stops = set(int(s) for s in stop)
        eos = self.manifest.model.get("eos_token_id")
        results: list[Generation] = []
        for index, prompt in enumerate(prompt_list):  # type: ignore[arg-type]
            ids = self.encode(prompt)  # type: ignore[arg-type]
            if not ids:
                raise MoedgeError("a prompt must have at least one token")
            if self.context and len(ids) >= self.context:
                raise MoedgeError(
                    f"prompt {index} has {len(ids)} tokens; the model's context is {self.context}: shorten it"
                )
            results.append(Generation(prompt_ids=ids, token_ids=[]))
        groups = [list(enumerate(results))] if batch and results else [[row] for row in enumerate(results)]
        done: list[Generation] = []
        for rows in groups:
            try:
                self._generate_rows(
                    rows, max_new_tokens, temperature, top_k, top_p, rng, stops, eos, on_token
                )
            except KeyboardInterrupt:
                self.metrics.interrupted = True
                break
            finally:
                for _, gen in rows:
                    gen.text = self.decode(gen.token_ids) if self.tokenizer is not None else None
                done += [gen for _, gen in rows]
        return done

    def _generate_rows(
        self,
        rows: list[tuple[int, Generation]],
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        rng: np.random.Generator,
        stops: set[int],
        eos: int | None,
        on_token: Callable[[int, int], None] | None,
    ) -> None:
        """``(prompt index, generation)`` rows as one batch: left padding, an attention mask, per-row
        positions; a finished row leaves the batch. Ctrl-C marks the rows still running ``interrupt``."""
        gens = dict(rows)
        width = max(len(g.prompt_ids) for g in gens.values())
        step = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, (_, g) in enumerate(rows):
            step[row, width - len(g.prompt_ids) :] = g.prompt_ids
            mask[row, width - len(g.prompt_ids) :] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        active = [index for index, _ in rows]  # prompt indexes still generating, in batch order
        try:
            past: Any = None
            for i in range(max_new_tokens):
                start = time.perf_counter()
                logits, past = self.forward(step, past, mask, positions)
                tokens = [_sample(logits[r, -1], rng, temperature, top_k, top_p) for r in range(len(active))]
                elapsed = time.perf_counter() - start
                if i == 0:
                    self.metrics.prompt_tokens += int(mask.sum())
                    self.metrics.prompt_seconds += elapsed
                else:
                    self.metrics.decode_tokens += len(active)
                    self.metrics.decode_seconds += elapsed
                    self.metrics.token_latencies.append(elapsed)
                keep: list[int] = []
                for r, (index, token) in enumerate(zip(active, tokens, strict=True)):
                    gen = gens[index]
                    gen.token_ids.append(token)
                    if on_token is not None:
                        on_token(index, token)
                    if eos is not None and token == eos:
                        gen.stopped_by = "eos"
                    elif token in stops:
                        gen.stopped_by = "stop"
                    elif self.context and len(gen.prompt_ids) + i + 1 >= self.context:
                        gen.stopped_by = "context"
                    else:
                        keep.append(r)
                if not keep:
                    return
                if len(keep) < len(active):  # finished rows leave the batch and its cache
                    past = [kv[keep] for kv in past]
                    mask, positions = mask[keep], positions[keep]
                    active = [active[r] for r in keep]
                    tokens = [tokens[r] for r in keep]
                step = np.asarray(tokens, dtype=np.int64)[:, None]
                mask = np.concatenate([mask, np.ones((len(active), 1), dtype=np.int64)], axis=1)
                positions = positions[:, -1:] + 1
        except KeyboardInterrupt:
            for index in active:
                if gens[index].stopped_by == "length":  # not already stopped in the interrupted step
                    gens[index].stopped_by = "interrupt"
            raise

    def summary(self) -> dict[str, Any]:
        """The run's metrics (see :class:`RunMetrics`)."""
        out = self.metrics.summary(self.scheduler, self.gpu)
        out["backend"] = self.backend_name
        out["profile"] = self.profile.name if self.scheduler is not None else None
        return out

    def close(self) -> None:
        """Stop the worker threads."""
        for pool in (getattr(self, "_pool", None), getattr(self, "_loader", None)):
            if pool is not None:
                pool.shutdown()
