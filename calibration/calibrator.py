"""Layer-by-layer W8A8 calibration: rtn, smoothquant, gptq and HAQ, producing a fake-quant model.

Only one decoder layer's statistics exist at a time: the inputs of layer 0 are captured for every
calibration sequence, then each layer is observed in full precision (streamed statistics), smoothed,
quantized, and run again quantized to produce the next layer's inputs, so the error each layer sees
includes the quantization of every layer before it (GPTQ's sequential scheme).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moedge._errors import MoedgeError
from moedge.calibration.layers import (
    HeadBlock,
    LayerSpec,
    SmoothGroup,
    decoder_layers,
    head_modules,
    head_spec,
    layer_spec,
    untie_head,
)
from moedge.calibration.observers import InputObserver, observe
from moedge.calibration.quant import FakeQuantLinear, act_scale, gptq, rtn_weight
from moedge.calibration.search import (
    COARSE_CLIPS,
    group_error,
    output_error,
    search_clip,
    smoothing_scale,
)
from moedge.model import LoadedModel
from moedge.runtime.routing import RoutingRecorder

log = logging.getLogger(__name__)

METHODS = ("rtn", "smoothquant", "gptq", "haq")
ACT_CLIPS = ("absmax", "percentile", "mse", "output")
# SmoothQuant's published strengths: 0.5 for OPT, 0.8 for Mixtral (and the Llama family).
SMOOTHQUANT_ALPHA = {"opt": 0.5}
SMOOTHQUANT_DEFAULT_ALPHA = 0.8
# Up to 1.0: with the grid ending at 0.9, 83 of smollm2-135m's 120 groups chose 0.9; extending it moved
# 52 groups higher and WikiText-2 from 31.017 to 30.972 (benchmarks/calibration_table.py, haq-a1 row).
HAQ_ALPHAS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 1.0)


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Every setting of a calibration run; recorded in the recipe.

    ``method`` picks the defaults: ``rtn`` (no smoothing, round-to-nearest weights, absmax
    activations), ``smoothquant`` (norm-preceded groups smoothed at one published strength, RTN,
    absmax), ``gptq`` (Hessian-aware weights, absmax activations), ``haq`` (every foldable group
    smoothed at a strength searched per group, Hessian-aware weights, activation range searched by
    output error). ``act_clip`` and ``alpha`` override the method's choice.
    """

    method: str = "haq"
    act_clip: str | None = None  # absmax | percentile | mse | output (None: the method's default)
    percentile: float = 99.99
    alpha: float | None = None  # fixed smoothing strength (None: the method's default or search)
    alpha_grid: tuple[float, ...] = HAQ_ALPHAS
    sample_tokens: int = 1024
    search_tokens: int = 512  # rows of the sample used while searching the smoothing strength
    gptq_damp: float = 0.01
    gptq_block: int = 128
    act_order: bool = True
    keep_fp: tuple[str, ...] = ()
    auto_keep_fp: float = 0.0  # fraction of linear parameters the automatic mixed-precision mode may keep
    probe_sequences: int = 8  # calibration sequences the automatic mode measures loss sensitivity on
    quantize_head: bool = False  # the LM head too (final norm smoothed into it), as llama.cpp's Q8_0 does
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MoedgeError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.act_clip is not None and self.act_clip not in ACT_CLIPS:
            raise MoedgeError(
                f"unknown activation clipping {self.act_clip!r}; choose one of {', '.join(ACT_CLIPS)}"
            )
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise MoedgeError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.auto_keep_fp < 1.0:
            raise MoedgeError(f"the automatic FP fraction must be in [0, 1), got {self.auto_keep_fp}")

    @property
    def clip_mode(self) -> str:
        """How activation ranges are chosen."""
        return self.act_clip or ("output" if self.method == "haq" else "absmax")

    @property
    def hessian_weights(self) -> bool:
        """Whether weights are quantized with GPTQ (else round-to-nearest)."""
        return self.method in ("gptq", "haq")

    def groups_smoothed(self, group: SmoothGroup) -> bool:
        """Whether ``group`` is smoothed under this method."""
        if self.method == "haq":
            return True
        if self.method == "smoothquant":
            return group.kind == "norm"
        return False


@dataclass
class LinearReport:
    """What calibration decided and measured for one linear."""

    quantized: bool
    group: str | None
    alpha: float | None
    input_scale: float | None
    clip_ratio: float | None
    input_absmax: float
    outlier_ratio_before: float
    outlier_ratio_after: float
    rel_error: float  # ||Y_q - Y||² / ||Y||² on the calibration sample, W8A8 vs FP
    params: int
    tokens: int


@dataclass
class CalibrationResult:
    """The calibrated (fake-quant) model and everything the recipe records."""

    config: CalibrationConfig
    linears: dict[str, LinearReport]
    smoothing: dict[str, float | None]
    kept_fp: list[str]
    routing: dict[str, Any] | None
    seconds: float
    peak_rss_mb: float
    samples: int
    tokens: int
    excluded: list[str] = field(default_factory=list)
    # smoothed FP weights of the quantized linears, kept only when asked (automatic mixed precision)
    fp_weights: dict[str, tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict, repr=False
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (routing is written separately)."""
        return {
            "config": asdict(self.config),
            "linears": {k: asdict(v) for k, v in self.linears.items()},
            "smoothing": self.smoothing,
            "kept_fp": self.kept_fp,
            "excluded": self.excluded,
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "samples": self.samples,
            "tokens": self.tokens,
        }


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0 to record its inputs, then stops the forward pass."""

    def __init__(self, inner: nn.Module, sink: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
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
    precision, and so does lm_head unless ``config.quantize_head`` (then a tied head gets its own copy). The model's fused experts are split per expert for good. ``retain_fp`` keeps the
    smoothed FP weights so ``keep_most_sensitive`` can run later (the automatic mode does it here).
    """
    from moedge.export.configs import get_config
    from moedge.export.patchers import split_experts

    cfg = config or CalibrationConfig()
    model = loaded.model
    arch = get_config(loaded.model_type)
    check_finite_weights(model)
    _validate_samples(samples, int(model.config.vocab_size))
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model.eval()
    split_experts(model, arch)
    layers = decoder_layers(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    num_experts = arch.num_experts(model.config)
    routing = (
        RoutingRecorder(num_experts, int(getattr(model.config, "num_experts_per_tok", 0) or 0))
        if num_experts
        else None
    )
    if cfg.method == "smoothquant" and cfg.alpha is None:
        alpha_fixed: float | None = SMOOTHQUANT_ALPHA.get(loaded.model_type, SMOOTHQUANT_DEFAULT_ALPHA)
    else:
        alpha_fixed = cfg.alpha

    with torch.no_grad():
        cache: list[tuple[torch.Tensor, dict[str, Any]]] = []
        layers[0] = _Catcher(layers[0], cache)
        try:
            for batch in _batches(samples, cfg.batch_size):
                try:
                    model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
        finally:
            catcher: Any = layers[0]
            layers[0] = catcher.inner
        tokens = sum(int(h.shape[0] * h.shape[1]) for h, _ in cache)

        reports: dict[str, LinearReport] = {}
        excluded = ["lm_head"]
        smoothing: dict[str, float | None] = {}
        fp_weights: dict[str, tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]] = {}
        if cfg.quantize_head:
            head_modules(model)  # fail before the long layer loop, not after it
        for index in tqdm(
            range(len(layers)), desc=f"calibrate [{cfg.method}]", unit="layer", disable=not progress
        ):
            layer = layers[index]
            spec = layer_spec(model, index)
            name_prefix = prefix[id(layer)]
            excluded += [f"{name_prefix}.{r}" for r in spec.routers]
            _calibrate_layer(
                layer,
                spec,
                cache,
                cfg,
                alpha_fixed,
                routing,
                name_prefix,
                reports,
                smoothing,
                fp_weights if (retain_fp or cfg.auto_keep_fp > 0) else None,
            )
            for i, (hidden, kwargs) in enumerate(cache):
                out = _layer_out(layer(hidden, **kwargs))
                if not torch.isfinite(out).all():
                    raise MoedgeError(
                        f"non-finite activations after quantized layer {index}: calibration stopped"
                    )
                cache[i] = (out, kwargs)
        if cfg.quantize_head:
            excluded.remove("lm_head")
            _calibrate_head(
                model,
                cache,
                cfg,
                alpha_fixed,
                reports,
                smoothing,
                fp_weights if (retain_fp or cfg.auto_keep_fp > 0) else None,
            )
        cache.clear()

    kept = [n for n, r in reports.items() if not r.quantized]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result = CalibrationResult(
        config=cfg,
        linears=reports,
        smoothing=smoothing,
        kept_fp=kept,
        routing=routing.to_dict() if routing is not None else None,
        seconds=time.perf_counter() - start,
        peak_rss_mb=peak,
        samples=len(samples),
        tokens=tokens,
        excluded=excluded,
        fp_weights=fp_weights,
    )
    if cfg.auto_keep_fp > 0:
        keep_most_sensitive(loaded, result, cfg.auto_keep_fp, samples[: cfg.probe_sequences])
        if not retain_fp:
            result.fp_weights = {}
    return result


def keep_most_sensitive(
    loaded: LoadedModel, result: CalibrationResult, fraction: float, probe: Sequence[np.ndarray]
) -> list[str]:
    """Automatic mixed precision: return the quantized linears that cost the most loss to FP.

    At most ``fraction`` of the linear parameters (every expert's linear counts on its own); the cost
    is measured on the ``probe`` sequences (see ``_auto_keep``). Needs ``calibrate(..., retain_fp=True)``
    or ``auto_keep_fp`` in the config. Returns the names kept, also appended to ``result.kept_fp``.
    """
    if not result.fp_weights:
        raise MoedgeError(
            "the FP weights were not retained: calibrate with retain_fp=True or auto_keep_fp > 0"
        )
    ids = [torch.from_numpy(np.asarray(x)).long() for x in probe]
    start = time.perf_counter()
    kept = _auto_keep(result.linears, result.fp_weights, fraction, loaded.model, ids)
    result.kept_fp += kept
    result.seconds += time.perf_counter() - start
    return kept


def _keep_pattern(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _calibrate_head(
    model: nn.Module,
    cache: list[tuple[torch.Tensor, dict[str, Any]]],
    cfg: CalibrationConfig,
    alpha_fixed: float | None,
    reports: dict[str, LinearReport],
    smoothing: dict[str, float | None],
    fp_weights: dict[str, tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]] | None,
) -> None:
    """Smooth the final norm into the LM head and quantize the head, like any decoder-layer linear."""
    untie_head(model)
    _, norm = head_modules(model)
    block = HeadBlock(norm, model.lm_head)  # type: ignore[arg-type]
    _calibrate_layer(
        block, head_spec(block), cache, cfg, alpha_fixed, None, "", reports, smoothing, fp_weights
    )
    model.lm_head = block.lm_head
    if fp_weights is not None and "lm_head" in fp_weights:
        _, leaf, w, b = fp_weights["lm_head"]
        fp_weights["lm_head"] = (model, leaf, w, b)


def _calibrate_layer(
    layer: nn.Module,
    spec: LayerSpec,
    cache: list[tuple[torch.Tensor, dict[str, Any]]],
    cfg: CalibrationConfig,
    alpha_fixed: float | None,
    routing: RoutingRecorder | None,
    name_prefix: str,
    reports: dict[str, LinearReport],
    smoothing: dict[str, float | None],
    fp_weights: dict[str, tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]] | None,
) -> None:
    """Observe, smooth, quantize one layer in place."""

    def qualified(name: str) -> str:
        return f"{name_prefix}.{name}" if name_prefix else name

    keep = {n for n in spec.linears if _keep_pattern(qualified(n), cfg.keep_fp)}
    hessian_keys = (
        {spec.input_key[n] for n in spec.linears if n not in keep} if cfg.hessian_weights else set()
    )
    handle = None
    if routing is not None and spec.experts_module is not None:
        routing.reset_layer(spec.index)

        def on_route(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            routing.record(spec.index, args[1].detach().cpu().numpy())

        handle = spec.experts_module.register_forward_pre_hook(on_route)
    try:
        with observe(
            spec.observed,
            hessian_keys=hessian_keys,
            sample_tokens=cfg.sample_tokens,
            seed=cfg.seed,
            histogram=cfg.clip_mode == "percentile",
        ) as obs:
            for hidden, kwargs in cache:
                layer(hidden, **kwargs)
    finally:
        if handle is not None:
            handle.remove()

    # 1. Smoothing, group by group: pick the strength, fold the scale.
    cols: dict[str, torch.Tensor] = {}  # input key -> column scale its consumers' inputs were divided by
    group_of: dict[str, tuple[str | None, float | None]] = {}
    for group in spec.groups:
        gname = qualified(group.name)
        consumers = [n for n in group.consumers if n not in keep]
        stat = obs[group.stat_key]
        alpha: float | None = None
        if cfg.groups_smoothed(group) and stat.absmax is not None and consumers:
            s, alpha = _choose_smoothing(group, consumers, spec, obs, cfg, alpha_fixed)
            if s is not None:
                group.fold(s, spec.linears)
                expanded = s if group.expand is None else s[group.expand]
                for n in group.consumers:
                    cols[spec.input_key[n]] = expanded
            else:
                alpha = None
        smoothing[gname] = alpha
        for n in group.consumers:
            group_of[n] = (gname, alpha)

    # 2. Weights and activation ranges, linear by linear.
    for name, lin in spec.linears.items():
        full = qualified(name)
        key = spec.input_key[name]
        o = obs[key]
        col = cols.get(key)
        params = lin.weight.numel()
        group_name, alpha = group_of.get(name, (None, None))
        if o.tokens == 0:
            log.warning(
                "%s: no calibration token was routed to it; identity Hessian, range from its peers", full
            )
        before = o.outlier_ratio()
        absmax_vec = o.absmax if o.absmax is not None else torch.zeros(lin.in_features)
        smoothed_absmax = absmax_vec / col if col is not None else absmax_vec
        after = (
            float(smoothed_absmax.max()) / max(float(smoothed_absmax.median()), 1e-12)
            if o.tokens
            else math.nan
        )
        amax = float(smoothed_absmax.max())
        if name in keep:
            reports[full] = LinearReport(
                False, group_name, alpha, None, None, amax, before, after, 0.0, params, o.tokens
            )
            continue
        w = lin.weight.detach().to(torch.float32)
        if cfg.hessian_weights and o.tokens > 0:
            h = o.hessian
            if col is not None:
                h = h / (col[:, None] * col[None, :])
            q, sc = gptq(w, h, damp=cfg.gptq_damp, block_size=cfg.gptq_block, act_order=cfg.act_order)
        else:
            q, sc = rtn_weight(w)
        w_deq = q.to(torch.float32) * sc[:, None]
        rel = math.nan
        ratio: float | None = 1.0
        if o.tokens == 0:
            clip = _peer_clip(reports, full) or 1.0
            ratio = None
        else:
            x, rw = o.rows()
            if col is not None:
                x = x / col
            y_ref = x @ w.T
            mode = cfg.clip_mode
            if mode == "absmax":
                clip = amax
            elif mode == "percentile":
                if col is None:
                    clip = o.percentile(cfg.percentile)  # streamed histogram of every element
                else:  # the histogram is of the unsmoothed input: use the uniform rows, smoothed
                    uniform = x[rw == 1].abs().flatten()
                    clip = float(torch.quantile(uniform[: 1 << 24], cfg.percentile / 100.0))
                clip = min(max(clip, 1e-8), amax) if amax > 0 else 1.0
                ratio = clip / amax if amax > 0 else 1.0
            elif mode == "mse":
                ratio, _ = search_clip(x, amax, weights=rw, refine=True)
                clip = ratio * amax
            else:
                ratio, _ = search_clip(
                    x, amax, w_deq=w_deq, y_ref=y_ref, weights=rw, ratios=COARSE_CLIPS, refine=True
                )
                clip = ratio * amax
            denom = float((y_ref.square().sum(dim=1) * rw).sum())
            rel = output_error(x, w_deq, y_ref, clip, rw) / denom if denom > 0 else 0.0
        bias = lin.bias.detach() if lin.bias is not None else None
        fq = FakeQuantLinear(q, sc, bias, act_scale(clip))
        parent_name, _, leaf = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        if fp_weights is not None:
            fp_weights[full] = (parent, leaf, w.clone(), None if bias is None else bias.clone())
        setattr(parent, leaf, fq)
        reports[full] = LinearReport(
            True, group_name, alpha, act_scale(clip), ratio, amax, before, after, rel, params, o.tokens
        )


def _peer_clip(reports: dict[str, LinearReport], full: str) -> float | None:
    """The widest activation range among already calibrated experts of the same role in the layer."""
    head, _, leaf = full.rpartition(".")
    layer_prefix = head.rsplit(".experts.", 1)[0]
    peers = [
        r.input_scale * 127
        for n, r in reports.items()
        if n.startswith(layer_prefix + ".experts.") and n.endswith("." + leaf) and r.input_scale is not None
    ]
    return max(peers) if peers else None


def _choose_smoothing(
    group: SmoothGroup,
    consumers: list[str],
    spec: LayerSpec,
    obs: dict[str, InputObserver],
    cfg: CalibrationConfig,
    alpha_fixed: float | None,
) -> tuple[torch.Tensor | None, float | None]:
    """The group's smoothing scale (over producer channels) and its strength; (None, None) for no smoothing.

    A searched strength is judged out of sample: scales and ranges come from the even calibration
    batches, the error from rows of the odd ones. Judged in sample, the strongest smoothing always
    looks best, because it puts every channel exactly at its calibration maximum, and the first
    unseen excursion is clipped.
    """
    stat = obs[group.stat_key]
    assert stat.absmax is not None
    w_absmax_cols = torch.stack([spec.linears[n].weight.detach().abs().amax(dim=0) for n in consumers]).amax(
        dim=0
    )

    def to_producer(cols_vec: torch.Tensor) -> torch.Tensor:
        if group.expand is None:
            return cols_vec
        # GQA: several o columns read one v channel; the channel takes their maximum
        return torch.zeros(group.channels).scatter_reduce(
            0, group.expand, cols_vec, "amax", include_self=False
        )

    def cols_of(s: torch.Tensor) -> torch.Tensor:
        return s if group.expand is None else s[group.expand]

    w_absmax = to_producer(w_absmax_cols)
    if alpha_fixed is not None:
        return smoothing_scale(to_producer(stat.absmax), w_absmax, alpha_fixed), alpha_fixed

    live = [n for n in consumers if obs[spec.input_key[n]].tokens > 0]
    if not live:
        return None, None
    held_out = stat.batches >= 2 and stat.half_absmax[0] is not None
    eval_half = 1 if held_out else None

    def fit_absmax(o: InputObserver) -> torch.Tensor:
        vec = o.half_absmax[0] if held_out and o.half_absmax[0] is not None else o.absmax
        assert vec is not None
        return vec

    samples = []
    absmaxes = []
    weights = []
    for n in live:
        o = obs[spec.input_key[n]]
        rows = o.rows(cfg.search_tokens, half=eval_half)
        if rows[0].shape[0] == 0:
            rows = o.rows(cfg.search_tokens)
        samples.append(rows)
        absmaxes.append(fit_absmax(o))
        weights.append(spec.linears[n].weight.detach().to(torch.float32))
    x_absmax = to_producer(fit_absmax(stat))
    clip_search = cfg.clip_mode == "output"
    best_err = group_error(
        samples, weights, absmaxes, torch.ones_like(w_absmax_cols), clip_search=clip_search
    )
    best_alpha: float | None = None
    for alpha in cfg.alpha_grid:
        s = smoothing_scale(x_absmax, w_absmax, alpha)
        e = group_error(samples, weights, absmaxes, cols_of(s), clip_search=clip_search)
        if e < best_err:
            best_err, best_alpha = e, alpha
    if best_alpha is None:
        return None, None
    return smoothing_scale(to_producer(stat.absmax), w_absmax, best_alpha), best_alpha


def _auto_keep(
    reports: dict[str, LinearReport],
    fp_weights: dict[str, tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]],
    fraction: float,
    model: nn.Module,
    probe: list[torch.Tensor],
    candidates: int = 16,
) -> list[str]:
    """Return the linears whose quantization costs the most loss to full precision, within ``fraction``
    of the linear parameters.

    Costs are measured, not guessed from local errors (which rank poorly: see ARCHITECTURE.md). A
    forward/backward pass of the quantized model over ``probe`` sequences estimates, per linear, the
    first-order loss change of removing its output error; the ``candidates`` largest are then each
    restored alone and the probe loss measured; linears are kept greedily by measured loss saved.
    """
    total = sum(r.params for r in reports.values())
    budget = fraction * total
    estimate = _revert_gains(model, fp_weights, probe)
    shortlist = sorted(
        (n for n, r in reports.items() if r.quantized and n in estimate and r.params <= budget),
        key=lambda n: estimate[n],
        reverse=True,
    )[:candidates]  # by the whole loss each would save: a per-parameter rank fills the budget with noise
    base = _probe_loss(model, probe)
    measured: dict[str, float] = {}
    for name in shortlist:
        parent, leaf, _, _ = fp_weights[name]
        quantized = getattr(parent, leaf)
        setattr(parent, leaf, _fp_linear(fp_weights[name]))
        measured[name] = base - _probe_loss(model, probe)
        setattr(parent, leaf, quantized)
        log.debug("restoring %s saves %.4f nats on the probe", name, measured[name])
    kept: list[str] = []
    used = 0
    for name in sorted(measured, key=lambda n: measured[n], reverse=True):
        r = reports[name]
        if measured[name] <= 0 or used + r.params > budget:
            continue
        parent, leaf, _, _ = fp_weights[name]
        setattr(parent, leaf, _fp_linear(fp_weights[name]))
        r.quantized = False
        kept.append(name)
        used += r.params
    log.info(
        "automatic mixed precision kept %d linears (%.2f%% of linear parameters) in FP",
        len(kept),
        100 * used / total,
    )
    return kept


def _fp_linear(entry: tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]) -> nn.Linear:
    _, _, w, b = entry
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def _probe_loss(model: nn.Module, probe: list[torch.Tensor]) -> float:
    """Summed next-token NLL (nats) over the probe sequences."""
    total = 0.0
    with torch.no_grad():
        for ids in probe:
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
            total += float(nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum"))
    return total


def _revert_gains(
    model: nn.Module,
    fp_weights: dict[str, tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]],
    probe: list[torch.Tensor],
) -> dict[str, float]:
    """First-order loss reduction from restoring each quantized linear's FP output (see ``_auto_keep``)."""
    gains: dict[str, float] = dict.fromkeys(fp_weights, 0.0)
    handles = []
    for name, (parent, leaf, w, b) in fp_weights.items():
        module = getattr(parent, leaf)

        def hook(
            _m: nn.Module,
            args: tuple[torch.Tensor, ...],
            out: torch.Tensor,
            name: str = name,
            w: torch.Tensor = w,
            b: torch.Tensor | None = b,
        ) -> None:
            delta = (out - nn.functional.linear(args[0], w, b)).detach()

            def on_grad(g: torch.Tensor) -> None:
                gains[name] -= float((g * delta).sum())

            out.register_hook(on_grad)

        handles.append(module.register_forward_hook(hook))
    emb = model.get_input_embeddings()  # type: ignore[operator]
    handles.append(emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    try:
        with torch.enable_grad():
            for ids in probe:
                logits = model(input_ids=ids[None], use_cache=False).logits[0]
                loss = nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")
                loss.backward()
    finally:
        for h in handles:
            h.remove()
    return gains
