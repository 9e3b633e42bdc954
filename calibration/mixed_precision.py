"""Automatic mixed precision: keep in FP the quantized linears whose int8 form costs the most loss."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.result import CalibrationResult, FpWeight, LinearReport
from moedge.calibration.rotation import as_rotated, input_rotation
from moedge.model import LoadedModel

log = logging.getLogger(__name__)


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


def _auto_keep(
    reports: dict[str, LinearReport],
    fp_weights: dict[str, FpWeight],
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


def _fp_linear(entry: FpWeight) -> nn.Linear:
    """The FP linear an entry holds, rotating its input like the module it replaces does."""
    parent, leaf, w, b = entry
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    rotation = input_rotation(getattr(parent, leaf, None))
    return lin if rotation is None else as_rotated(lin, rotation)


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
    fp_weights: dict[str, FpWeight],
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
