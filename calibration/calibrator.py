"""Layer-by-layer W8A8 calibration: rtn, smoothquant, gptq and HAQ, producing a fake-quant model.

Only one decoder layer's statistics exist at a time: the inputs of layer 0 are captured for every
calibration sequence, then each layer is observed in full precision (streamed statistics), smoothed,
quantized, and run again quantized to produce the next layer's inputs, so the error each layer sees
includes the quantization of every layer before it (GPTQ's sequential scheme).

Per layer, four steps that hand each other values: observation (``observers.observe_layer``),
smoothing (``smoothing.smooth_layer``), one decision per linear (``decision.quantize_linear``) and the
swap of each quantized linear for its ``FakeQuantLinear``; the reports are built from the decisions.
"""

from __future__ import annotations

import fnmatch
import logging
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moedge._errors import MoedgeError
from moedge.calibration.config import CalibrationConfig
from moedge.calibration.decision import (
    LinearDecision,
    layer_input_ranges,
    layer_weight_codes,
    peer_clip,
    quantize_linear,
)
from moedge.calibration.layers import (
    HeadBlock,
    LayerSpec,
    decoder_layers,
    head_modules,
    head_spec,
    layer_spec,
    untie_head,
)

# benchmarks/mixed_precision_sensitivity.py imports these two from here
from moedge.calibration.mixed_precision import _fp_linear as _fp_linear
from moedge.calibration.mixed_precision import _probe_loss as _probe_loss
from moedge.calibration.mixed_precision import keep_most_sensitive
from moedge.calibration.observers import InputObserver, observe_layer
from moedge.calibration.phases import PHASES, PhaseClock
from moedge.calibration.quant import FakeQuantLinear
from moedge.calibration.residual_rotation import rotate_residual
from moedge.calibration.result import CalibrationResult, FpWeight, LinearReport
from moedge.calibration.rotate_layer import check_online_rotatable, choose_rotation, rotate_mlp_outputs
from moedge.calibration.rotation import (
    ONLINE_ROTATIONS,
    RESIDUAL_ROTATIONS,
    input_rotation,
)
from moedge.calibration.smoothing import SmoothingPlan, smooth_layer
from moedge.formats.routing import RoutingRecorder
from moedge.model import LoadedModel

__all__ = [
    "PHASES",
    "CalibrationConfig",
    "CalibrationResult",
    "LayerOutcome",
    "LinearReport",
    "PhaseClock",
    "calibrate",
    "calibrate_layer",
    "check_finite_weights",
    "keep_most_sensitive",
]

log = logging.getLogger(__name__)

_IDLE_QUANTIZED = (
    "round-to-nearest weights, the widest input range of its role's experts before it (else 1.0)"
)
Inputs = list[tuple[torch.Tensor, dict[str, Any]]]  # a layer's captured (hidden states, keyword arguments)


def calibrate(
    loaded: LoadedModel,
    samples: Sequence[np.ndarray],
    config: CalibrationConfig | None = None,
    *,
    progress: bool = True,
    retain_fp: bool = False,
) -> CalibrationResult:
    """Calibrate ``loaded.model`` in place into its W8A8 fake-quant form and report every decision.

    ``samples`` are token-id sequences (e.g. 128 windows of 512 tokens). Routers stay in full
    precision, and so does lm_head unless ``config.quantize_head`` (then a tied head gets its own
    copy). The model's fused experts are split per expert for good. ``retain_fp`` keeps the smoothed
    FP weights so ``keep_most_sensitive`` can run later (the automatic mode does it here).
    """
    from moedge.arch import get_config
    from moedge.arch.per_expert import split_experts

    cfg = config or CalibrationConfig()
    model = loaded.model
    arch = get_config(loaded.model_type)
    check_finite_weights(model)
    _validate_samples(samples, int(model.config.vocab_size))
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model.eval()
    split_experts(model, arch)
    clock = PhaseClock()
    if cfg.rotate == "auto":
        rotate, why = choose_rotation(model, loaded.model_type, loaded.name)
        log.info("--rotate auto: %s (%s)", rotate, why)
        cfg = replace(cfg, rotate=rotate)
    if cfg.rotate in RESIDUAL_ROTATIONS:  # the FP model, exactly, before any layer is observed
        with clock.phase("rotate-residual"):
            rotate_residual(model, loaded.model_type, cfg.seed, name=loaded.name)
    if cfg.rotate in ONLINE_ROTATIONS:
        check_online_rotatable(model)  # before the long layer loop, not in the middle of it
    num_experts = arch.num_experts(model.config)
    top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
    run = _Run(
        cfg,
        alpha_fixed=cfg.fixed_alpha(loaded.model_type),
        routing=RoutingRecorder(num_experts, top_k) if num_experts else None,
        retain_fp=retain_fp or cfg.auto_keep_fp > 0,
        clock=clock,
    )
    with torch.no_grad():
        with clock.phase("capture"):
            cache = _capture_inputs(model, samples, cfg.batch_size)
        tokens = sum(int(h.shape[0] * h.shape[1]) for h, _ in cache)
        _calibrate_model(model, cache, run, progress)
        cache.clear()
    result = run.result(
        seconds=time.perf_counter() - start,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        samples=len(samples),
        tokens=tokens,
    )
    if cfg.auto_keep_fp > 0:
        keep_most_sensitive(loaded, result, cfg.auto_keep_fp, samples[: cfg.probe_sequences])
        if not retain_fp:
            result.fp_weights = {}
    if cfg.tie_input_scales:
        from moedge.calibration.tie import tie_input_scales

        tie_input_scales(model, result, loaded.model_type)
    return result


@dataclass
class LayerOutcome:
    """What calibrating one layer decided: per linear (relative name), and its smoothing strengths."""

    decisions: dict[str, LinearDecision]
    smoothing: dict[str, float | None]
    fp_weights: dict[str, FpWeight]  # the replaced linears' smoothed FP weights, when asked for


@dataclass
class _Run:
    """The settings shared by every layer of one run, and the reports gathered from their outcomes."""

    config: CalibrationConfig
    alpha_fixed: float | None
    routing: RoutingRecorder | None
    retain_fp: bool
    clock: PhaseClock = field(default_factory=PhaseClock)
    reports: dict[str, LinearReport] = field(default_factory=dict)
    smoothing: dict[str, float | None] = field(default_factory=dict)
    fp_weights: dict[str, FpWeight] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=lambda: ["lm_head"])

    def add(self, outcome: LayerOutcome) -> None:
        """Record one layer's outcome (reports built from its decisions)."""
        self.reports.update({d.name: LinearReport.from_decision(d) for d in outcome.decisions.values()})
        self.smoothing.update(outcome.smoothing)
        self.fp_weights.update(outcome.fp_weights)

    def result(self, *, seconds: float, peak_rss_mb: float, samples: int, tokens: int) -> CalibrationResult:
        """The run's result, with its totals (time outside the timed phases counted as "other")."""
        phases = dict(self.clock.seconds)
        phases["other"] = max(0.0, seconds - sum(phases.values()))
        return CalibrationResult(
            config=self.config,
            linears=self.reports,
            smoothing=self.smoothing,
            kept_fp=[n for n, r in self.reports.items() if not r.quantized],
            routing=self.routing.to_dict() if self.routing is not None else None,
            seconds=seconds,
            peak_rss_mb=peak_rss_mb,
            samples=samples,
            tokens=tokens,
            excluded=self.excluded,
            phase_seconds={k: round(v, 3) for k, v in phases.items()},
            fp_weights=self.fp_weights,
        )


def _calibrate_model(model: nn.Module, cache: Inputs, run: _Run, progress: bool) -> None:
    """Calibrate every decoder layer in order (each on the quantized outputs of the previous), then the head."""
    cfg = run.config
    if cfg.quantize_head:
        head_modules(model)  # fail before the long layer loop, not after it
    layers = decoder_layers(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    for index in tqdm(
        range(len(layers)), desc=f"calibrate [{cfg.method}]", unit="layer", disable=not progress
    ):
        layer = layers[index]
        spec = layer_spec(model, index)
        name_prefix = prefix[id(layer)]
        run.excluded += [f"{name_prefix}.{r}" for r in spec.routers]
        outcome = calibrate_layer(
            layer,
            spec,
            cache,
            cfg,
            alpha_fixed=run.alpha_fixed,
            name_prefix=name_prefix,
            routing=run.routing,
            retain_fp=run.retain_fp,
            clock=run.clock,
        )
        run.add(outcome)
        with run.clock.phase("propagate"):
            _propagate(layer, cache, index)
    if cfg.quantize_head:
        run.excluded.remove("lm_head")
        run.add(_calibrate_head(model, cache, run))


def _capture_inputs(model: nn.Module, samples: Sequence[np.ndarray], batch_size: int) -> Inputs:
    """The inputs of decoder layer 0 for every calibration batch (the model stops there)."""
    layers = decoder_layers(model)
    cache: Inputs = []
    layers[0] = _Catcher(layers[0], cache)
    try:
        for batch in _batches(samples, batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        catcher: Any = layers[0]
        layers[0] = catcher.inner
    return cache


def _propagate(layer: nn.Module, cache: Inputs, index: int) -> None:
    """Replace each cached input by the (now quantized) layer's output: the next layer's input."""
    for i, (hidden, kwargs) in enumerate(cache):
        out = _layer_out(layer(hidden, **kwargs))
        if not torch.isfinite(out).all():
            raise MoedgeError(f"non-finite activations after quantized layer {index}: calibration stopped")
        cache[i] = (out, kwargs)


@contextmanager
def _recording_routing(routing: RoutingRecorder | None, spec: LayerSpec) -> Iterator[None]:
    """Record the layer's expert choices (the experts module's routing input) while inside."""
    experts = spec.experts_module
    if routing is None or experts is None:
        yield
        return
    routing.reset_layer(spec.index)

    def on_route(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        routing.record(spec.index, args[1].detach().cpu().numpy())

    handle = experts.register_forward_pre_hook(on_route)
    try:
        yield
    finally:
        handle.remove()


def calibrate_layer(
    layer: nn.Module,
    spec: LayerSpec,
    inputs: Inputs,
    config: CalibrationConfig,
    *,
    alpha_fixed: float | None = None,
    name_prefix: str = "",
    routing: RoutingRecorder | None = None,
    retain_fp: bool = False,
    clock: PhaseClock | None = None,
) -> LayerOutcome:
    """Observe, smooth, decide and swap one layer in place; return what was decided.

    ``inputs`` are the layer's captured inputs (left unchanged), ``name_prefix`` the layer's module
    name (linear names in the outcome are qualified with it). ``alpha_fixed``: the one smoothing
    strength (None: searched per group). ``routing`` records the layer's expert choices while it is
    observed. ``retain_fp`` keeps each swapped linear's smoothed FP weights. ``clock`` times the phases.
    """
    clock = clock or PhaseClock()

    def qualified(name: str) -> str:
        return f"{name_prefix}.{name}" if name_prefix else name

    keep = {n for n in spec.linears if _keep_pattern(qualified(n), config.keep_fp)}
    hessian_keys = (
        {spec.input_key[n] for n in spec.linears if n not in keep} if config.hessian_weights else set()
    )
    rotated = [n for n in spec.mlp_outputs if n not in keep] if config.rotate in ONLINE_ROTATIONS else []
    with _recording_routing(routing, spec), clock.phase("observe"):
        obs = observe_layer(
            layer,
            spec.observed,
            inputs,
            hessian_keys=hessian_keys,
            sample_tokens=config.sample_tokens,
            seed=config.seed,
            histogram=config.range_mode.histogram,
            retain_keys=frozenset(spec.input_key[n] for n in rotated),
            skip=[spec.linears[n] for n in spec.mlp_outputs],
        )
    with clock.phase("smooth"):
        plan = smooth_layer(spec, obs, keep, config, alpha_fixed, qualified)
    if rotated:
        with clock.phase("rotate"):
            rotate_mlp_outputs(spec, rotated, obs, plan)
    with clock.phase("decide"):
        decisions = _decide_linears(spec, obs, plan, keep, config, qualified)
    with clock.phase("swap"):
        fp_weights = swap_linears(layer, spec, decisions, retain_fp=retain_fp)
    return LayerOutcome(decisions, plan.alphas, fp_weights)


def _decide_linears(
    spec: LayerSpec,
    obs: dict[str, InputObserver],
    plan: SmoothingPlan,
    keep: set[str],
    config: CalibrationConfig,
    qualified: Callable[[str], str],
) -> dict[str, LinearDecision]:
    """One decision per linear of the layer, in order (an idle expert takes its range from the experts before it)."""
    decisions: dict[str, LinearDecision] = {}
    quantized = [n for n in spec.linears if n not in keep]
    weights = {n: spec.linears[n].weight for n in quantized}
    inputs = {n: obs[spec.input_key[n]] for n in quantized}
    cols = {n: plan.linears[n].cols for n in quantized}
    codes = layer_weight_codes(weights, inputs, cols, config)
    ranges = layer_input_ranges(weights, codes, inputs, cols, config)
    for name, lin in spec.linears.items():
        full = qualified(name)
        stats = obs[spec.input_key[name]]
        idle_clip = None
        if stats.tokens == 0:
            what = "kept in FP" if name in keep else _IDLE_QUANTIZED
            log.warning("%s: no calibration token was routed to it; %s", full, what)
            if name not in keep:
                idle_clip = peer_clip(decisions.values(), full)
        rotation = input_rotation(lin)
        decisions[name] = quantize_linear(
            full,
            lin.weight,
            stats,
            config,
            smoothing=plan.linears[name],
            keep_fp=name in keep,
            idle_clip=idle_clip,
            input_rotation=None if rotation is None else rotation.name,
            codes=codes.get(name),
            input_range=ranges.get(name),
        )
    return decisions


def swap_linears(
    layer: nn.Module, spec: LayerSpec, decisions: dict[str, LinearDecision], *, retain_fp: bool
) -> dict[str, FpWeight]:
    """Replace each quantized linear of ``layer`` by its ``FakeQuantLinear``.

    Returns, with ``retain_fp``, each replaced linear's (parent module, attribute, FP weight, bias).
    """
    fp_weights: dict[str, FpWeight] = {}
    for name, d in decisions.items():
        if d.kept_fp:
            continue
        assert d.qweight is not None and d.weight_scale is not None and d.input_scale is not None
        lin = spec.linears[name]
        bias = lin.bias.detach() if lin.bias is not None else None
        fq = FakeQuantLinear(d.qweight, d.weight_scale, bias, d.input_scale, rotation=input_rotation(lin))
        parent_name, _, leaf = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        if retain_fp:
            w = lin.weight.detach().to(torch.float32).clone()
            fp_weights[d.name] = (parent, leaf, w, None if bias is None else bias.clone())
        setattr(parent, leaf, fq)
    return fp_weights


def _calibrate_head(model: nn.Module, cache: Inputs, run: _Run) -> LayerOutcome:
    """Smooth the final norm into the LM head and quantize the head, like any decoder-layer linear."""
    untie_head(model)
    _, norm = head_modules(model)
    block = HeadBlock(norm, model.lm_head)  # type: ignore[arg-type]
    outcome = calibrate_layer(
        block,
        head_spec(block),
        cache,
        run.config,
        alpha_fixed=run.alpha_fixed,
        retain_fp=run.retain_fp,
        clock=run.clock,
    )
    model.lm_head = block.lm_head
    if "lm_head" in outcome.fp_weights:
        _, leaf, w, b = outcome.fp_weights["lm_head"]
        outcome.fp_weights["lm_head"] = (model, leaf, w, b)
    return outcome


def _keep_pattern(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0 to record its inputs, then stops the forward pass."""

    def __init__(self, inner: nn.Module, sink: Inputs) -> None:
        super().__init__()
        self.inner = inner
        self.sink = sink

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((hidden, kwargs))
        raise _Stop


def _batches(samples: Sequence[np.ndarray], batch_size: int) -> list[torch.Tensor]:
    """Group consecutive equal-length sequences into batches."""
    out: list[torch.Tensor] = []
    group: list[np.ndarray] = []
    for seq in samples:
        if group and (len(seq) != len(group[0]) or len(group) == batch_size):
            out.append(torch.from_numpy(np.stack(group)).long())
            group = []
        group.append(np.asarray(seq))
    if group:
        out.append(torch.from_numpy(np.stack(group)).long())
    return out


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose weights hold NaN or Inf."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise MoedgeError(
                f"weight {name} holds NaN or Inf values: the checkpoint is broken; calibration stopped"
            )


def _validate_samples(samples: Sequence[np.ndarray], vocab: int) -> None:
    if len(samples) == 0:
        raise MoedgeError("no calibration data: give at least one sequence (e.g. --calib-windows 128)")
    for seq in samples:
        arr = np.asarray(seq)
        if arr.ndim != 1 or len(arr) < 2:
            raise MoedgeError("every calibration sequence must be a 1-D run of at least 2 token ids")
        if arr.min() < 0 or arr.max() >= vocab:
            raise MoedgeError(f"calibration token ids must be in [0, {vocab}); got {arr.min()}..{arr.max()}")
