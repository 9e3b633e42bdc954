"""One activation scale for the linears that read the same input in one graph (q/k/v; gate/up).

HAQ picks each linear's static activation scale on its own, so q, k and v (and an MLP's gate and up)
quantize the same input three (two) times on three (two) grids. Tied to one scale, the input is
quantized once and ONNX Runtime's CPU target packs the linears into one int8 matmul
(``graph_passes/pack_linears.py``): fewer kernels per token. The tied scale is the largest of the
group's calibrated scales, so no linear clips more than calibration chose; the others get a coarser
grid, whose perplexity cost ``benchmarks/side_by_side.py`` measures. Weights are unchanged (a per-tensor
activation scale does not enter GPTQ's weight rounding).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping

from torch import nn

from moedge.arch import get_config
from moedge.calibration.quant import FakeQuantLinear
from moedge.calibration.result import CalibrationResult
from moedge.formats.recipe import Recipe


def tie_groups(names: Iterable[str], model_type: str) -> list[list[str]]:
    """The groups of ``names`` (full linear names) that read one input in one graph, two or more each:
    a layer's q/k/v, a dense MLP's or an expert's input linears (gate/up), in the family's naming."""
    smap = get_config(model_type).smoothing
    if smap is None:  # no map of which linears share an input: nothing to tie
        return []
    roles = {name.rsplit(".", 1)[-1]: "attention" for name in smap.qkv}
    roles.update({name: "mlp" for name in (*smap.mlp.inputs, *smap.expert_mlp.inputs)})
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if leaf in roles:
            groups[(parent, roles[leaf])].append(name)
    return [sorted(group) for group in groups.values() if len(group) > 1]


def tied_scales(scales: Mapping[str, float], model_type: str) -> dict[str, float]:
    """The linears of ``scales`` (quantized linear -> calibrated activation scale) whose scale the tie
    changes, with the group's largest scale each (see ``tie_groups``)."""
    changed: dict[str, float] = {}
    for group in tie_groups(scales, model_type):
        top = max(scales[name] for name in group)
        changed.update({name: top for name in group if scales[name] != top})
    return changed


def tie_input_scales(model: nn.Module, result: CalibrationResult, model_type: str) -> int:
    """Tie the calibrated ``model``'s activation scales (and ``result``'s reports) per ``tie_groups``;
    each changed report keeps its calibrated scale as ``untied_input_scale``. Returns how many changed."""
    modules = dict(model.named_modules())
    scales = {
        name: float(report.input_scale)
        for name, report in result.linears.items()
        if report.quantized
        and report.input_scale is not None
        and isinstance(modules.get(name), FakeQuantLinear)
    }
    changed = tied_scales(scales, model_type)
    for name, top in changed.items():
        report = result.linears[name]
        report.untied_input_scale, report.input_scale = report.input_scale, top
        modules[name].input_scale = top  # type: ignore[assignment]
    return len(changed)


def tie_recipe_scales(recipe: Recipe) -> Recipe:
    """``recipe`` as if it had been calibrated with ``tie_input_scales`` (``config.tie_input_scales``
    true): the same tie on its recorded scales, in memory; the folder is not touched."""
    meta = copy.deepcopy(recipe.meta)
    linears = meta["linears"]
    scales = {name: float(rec["input_scale"]) for name, rec in linears.items() if rec.get("quantized")}
    for name, top in tied_scales(scales, str(meta["model"]["model_type"])).items():
        linears[name]["untied_input_scale"], linears[name]["input_scale"] = linears[name]["input_scale"], top
    meta["config"]["tie_input_scales"] = True
    return Recipe(recipe.path, meta)
