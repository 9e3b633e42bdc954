"""Running passes: an onnx-ir ``PassManager``, validating the model between passes in debug mode."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase], *, debug: bool = False) -> ir.Model:
    """Apply ``passes`` in order; with ``debug``, the ONNX checker runs after each one.

    Shape inference is not rerun on the exported graphs: torch.export already stamped every value
    with its (symbolic) shape, and ONNX's inference cannot follow data-dependent expert shapes. The
    checker reads every tensor, so in debug mode external weights are loaded into memory first.
    """
    if debug:
        model = ir.external_data.load_to_model(model)
    steps: list[ir.passes.PassBase] = []
    for p in passes:
        steps.append(p)
        if debug:
            steps.append(common_passes.CheckerPass(full_check=False))
    return ir.passes.PassManager(steps)(model).model
