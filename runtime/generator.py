"""Generation on a CPU+GPU pair with a byte-budgeted GPU expert cache: the deployment API.

``Generator`` loads a bundle, places stage graphs on the GPU backend and experts where the policy
and the latency predictor say (``moedge.runtime.scheduler``, ``policies``, ``predictor``), and
generates with a KV cache through the one generation loop (``moedge.runtime.decoding``): greedy or
sampled (seeded), streaming tokens, stop tokens, several prompts. The bundle runs as the reference
``BundleRunner`` does, with the cached runtime's expert executor (``moedge.runtime.expert_executor``):
per layer, GPU hits and CPU misses run in parallel threads and are combined in expert order, so the
output does not depend on where an expert ran. With the ``simulated`` backend everything executes
on the CPU and the GPU side is modeled on a hardware profile; modeled figures are labelled so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError
from moedge.arch import get_by_name
from moedge.formats.manifest import read_manifest
from moedge.formats.placement_plan import read_plan_file
from moedge.formats.routing import RoutingStats, read_routing
from moedge.runtime.backends.base import Backend, make_backend
from moedge.runtime.backends.ort_cpu import OrtCpuBackend
from moedge.runtime.backends.simulated_gpu import SimulatedGpuBackend
from moedge.runtime.bundle_runner import BundleRunner
from moedge.runtime.cache import ExpertKey
from moedge.runtime.costs import ModelCosts, parse_budget
from moedge.runtime.decoding import (
    Generation,
    Sampling,
    StopRule,
    cached_tokens,
    check_prompts,
    generate_into,
)
from moedge.runtime.expert_executor import CachedExecutor
from moedge.runtime.policies import get_policy
from moedge.runtime.predictor import LatencyPredictor, fit_cpu_timings
from moedge.runtime.profiles import HardwareProfile, load_profile
from moedge.runtime.scheduler import ExpertScheduler

log = logging.getLogger(__name__)


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
    load_seconds: float = 0.0  # reading the bundle and creating every session, before any prompt

    def summary(self, scheduler: ExpertScheduler | None, backend: Backend) -> dict[str, Any]:
        """Everything ``moedge run`` prints and ``--metrics-json`` writes."""
        lat = np.asarray(self.token_latencies or [0.0]) * 1e3
        out: dict[str, Any] = {
            "backend": backend.name,
            "load_seconds": self.load_seconds,
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
        start = time.perf_counter()
        self.folder = Path(bundle)
        self.manifest = read_manifest(self.folder, verify=verify)
        self.cpu = OrtCpuBackend(intra_op_threads=intra_op_threads, shared_pool=shared_pool)
        self.profile = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
        self.costs = ModelCosts.from_manifest(self.manifest)
        self.parallel = parallel
        self.engines = engines
        self.tokenizer = self._tokenizer()
        self.context = int(self.manifest.model.get("max_position_embeddings") or 0)
        self.metrics = RunMetrics()
        self.scheduler: ExpertScheduler | None = None
        self.executor: CachedExecutor | None = None
        cached = backend != "ort-cpu" and cache
        if cached:
            self.manifest.require_separate_experts(
                f"--backend {backend} (an expert cache; --backend ort-cpu or --no-cache runs it)", self.folder
            )
        self.backend_name = backend if cached else "ort-cpu"
        self.gpu: Backend = self._make_gpu(backend, intra_op_threads) if cached else self.cpu
        if cached and self.costs.moe_layers:
            self.executor = CachedExecutor(
                self.folder,
                self._expert_graph,
                self.cpu,
                self.gpu,
                parallel=parallel,
                record=self._record,
            )
        self.runner = BundleRunner(
            self.folder,
            manifest=self.manifest,
            cpu=self.cpu,
            stage_backend=self.gpu,
            executor=self.executor,
        )
        self._activate_base()
        if self.executor is not None:
            self.scheduler = self._make_scheduler(policy, gpu_budget, plan, routing)
            self.executor.attach(self.scheduler)
            self.runner.on_stage = self.scheduler.run_stage
        self.metrics.load_seconds = time.perf_counter() - start

    # --- set-up ------------------------------------------------------------------------------------
    def _make_gpu(self, backend: str, threads: int | None) -> Backend:
        if backend == "simulated":  # shares the CPU sessions: it executes on the CPU
            return SimulatedGpuBackend(profile=self.profile, cpu=self.cpu)
        if backend == "tensorrt":
            return make_backend(backend, intra_op_threads=threads, engine_dir=self.engines)
        return make_backend(backend, intra_op_threads=threads)

    def _make_scheduler(
        self,
        policy: str,
        gpu_budget: str | int | float | None,
        plan: str | Path | None,
        routing: str | Path | None,
    ) -> ExpertScheduler:
        assert self.executor is not None
        stats = self._routing(routing)
        pinned: list[ExpertKey] | None = None
        chosen = get_policy(policy)
        if plan is not None:
            pinned, settings = read_plan_file(plan)
            chosen = replace(chosen, **{k: v for k, v in settings.items() if hasattr(chosen, k)})
        free = self.gpu.free_memory()
        budget = parse_budget(gpu_budget, self.costs, free_device_bytes=free, context=self.context)
        predictor = LatencyPredictor(self.profile, int8=self.costs.int8, cpu_fit=self._cpu_fit())
        return ExpertScheduler(
            self.costs,
            chosen,
            budget,
            self.profile,
            stats=stats,
            plan=pinned,
            predictor=predictor,
            on_admit=self.executor.admit,
            on_evict=self.executor.evict,
        )

    def _expert_graph(self, key: ExpertKey) -> Any:
        layer, expert = key
        return self.runner.moe_layer(layer).expert_graph(expert)

    def _activate_base(self) -> None:
        """Create every session a run needs before it starts (so no prompt pays for loading): the
        stage graphs on the stage backend, and every expert's CPU session (misses run there)."""
        for graph in [
            self.manifest.embedding,
            *[run.stage for run in self.manifest.stage_runs()],
            self.manifest.head,
        ]:
            self.gpu.runner(self.folder, graph).activate()
        for layer in self.manifest.layers:
            for graph in layer.moe.experts if layer.moe is not None else []:
                self.cpu.runner(self.folder, graph).activate()

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

    def _record(self, layer: int, routed: dict[int, int], computed: dict[int, int]) -> None:
        self.metrics.routed[-1].update({(layer, e): n for e, n in routed.items()})
        step = self.metrics.computed[-1]
        for e, n in computed.items():
            step[(layer, e)] = step.get((layer, e), 0) + n

    # --- generation --------------------------------------------------------------------------------
    @property
    def uses_cache(self) -> bool:
        """Always True: a bundle's stages take and return the KV cache."""
        return True

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
        input_ids: np.ndarray,
        past: Any = None,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        last_only: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """One forward step through the cached runtime: logits for ``input_ids`` (batch x seq) after ``past``
        (``last_only``: only each row's last position's).

        Experts run where the scheduler places them (as in :meth:`generate`); the step counts in the
        metrics and the modeled clock. Returns the logits and the extended KV cache.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        context = cached_tokens(past)
        self.metrics.computed.append({})
        self.metrics.routed.append({})
        if self.scheduler is not None:
            self.scheduler.begin_step(int(ids.size), context, rows=int(ids.shape[0]))
        logits, present = self.runner.forward(
            ids, past=past, attention_mask=attention_mask, position_ids=position_ids, last_only=last_only
        )
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

        The loop is :func:`moedge.runtime.decoding.generate_into`. Several prompts run as one batch
        (left-padded, one forward pass per step for all of them; a prompt that stops leaves the batch)
        unless ``batch`` is False, which runs them one after another. Greedy when ``temperature`` is 0;
        otherwise sampled with ``top_k``/``top_p`` from ``seed``. Generation stops at the model's
        end-of-sequence token, a ``stop`` token, ``max_new_tokens``, or the context length. Ctrl-C ends
        it cleanly: the results so far come back with ``stopped_by="interrupt"`` and the metrics say
        ``interrupted``.
        """
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        prompt_list = (
            [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else prompts
        )
        eos = self.manifest.model.get("eos_token_id")
        rule = StopRule(
            max_new_tokens=max_new_tokens,
            eos_token_id=None if eos is None else int(eos),
            stop=frozenset(int(s) for s in stop),
            context=self.context,
        )
        results = [Generation(prompt_ids=self.encode(p)) for p in prompt_list]  # type: ignore[arg-type]
        check_prompts([g.prompt_ids for g in results], self.context)
        rng = np.random.default_rng(seed)
        groups = [list(range(len(results)))] if batch and results else [[i] for i in range(len(results))]
        done: list[Generation] = []
        for rows in groups:
            gens = [results[i] for i in rows]

            def stream(row: int, token: int, rows: list[int] = rows) -> None:
                if on_token is not None:
                    on_token(rows[row], token)

            try:
                generate_into(
                    self, gens, rule, sampling=sampling, rng=rng, on_token=stream, on_step=self._timed
                )
            except KeyboardInterrupt:
                self.metrics.interrupted = True
                break
            finally:
                for gen in gens:
                    gen.text = self.decode(gen.token_ids) if self.tokenizer is not None else None
                done += gens
        return done

    def _timed(self, decode: bool, tokens: int, seconds: float) -> None:
        if decode:
            self.metrics.decode_tokens += tokens
            self.metrics.decode_seconds += seconds
            self.metrics.token_latencies.append(seconds)
        else:
            self.metrics.prompt_tokens += tokens
            self.metrics.prompt_seconds += seconds

    def summary(self) -> dict[str, Any]:
        """The run's metrics (see :class:`RunMetrics`)."""
        out = self.metrics.summary(self.scheduler, self.gpu)
        out["backend"] = self.backend_name
        out["profile"] = self.profile.name if self.scheduler is not None else None
        return out

    def close(self) -> None:
        """Stop the worker threads."""
        if self.executor is not None:
            self.executor.close()
