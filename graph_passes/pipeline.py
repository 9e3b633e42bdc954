"""Running passes: an onnx-ir ``PassManager``, validating the model between passes in debug mode."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase], *, debug: bool = False) -> ir.Model:
    """Apply ``passes`` in order; with ``debug``, strict ONNX shape inference and the checker run after each.

    The checker reads every tensor, so in debug mode external weights are loaded into memory first.
    """
    if debug:
        model = ir.external_data.load_to_model(model)
    steps: list[ir.passes.PassBase] = []
    for p in passes:
        steps.append(p)
        if debug:
            steps += [common_passes.ShapeInferencePass(strict_mode=True), common_passes.CheckerPass()]
    return ir.passes.PassManager(steps)(model).model
