"""``moedge split``: an exported folder cut into a bundle (stages, one graph per expert, manifest.json)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moedge.cli.common import EXIT_OK, CommandOptions, set_handler
from moedge.formats.manifest import STAGE_TARGETS, TARGET_ORT_CPU, TARGET_TENSORRT


@dataclass(frozen=True)
class SplitOptions(CommandOptions):
    """The flags of ``moedge split``."""

    export_dir: Path
    output: Path
    overwrite: bool
    validate: bool
    target: str
    experts_in_graph: bool = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``split`` and its flags."""
    split = sub.add_parser(
        "split", help="cut an exported folder into a bundle: per-layer stages, one graph per expert, manifest"
    )
    split.add_argument("export_dir", metavar="EXPORT", type=Path, help="a folder written by moedge export")
    split.add_argument(
        "-o", "--output", type=Path, required=True, help="bundle folder to write (missing or empty)"
    )
    split.add_argument(
        "--overwrite",
        action="store_true",
        help="replace -o when it is a previous bundle holding only the files its manifest lists",
    )
    split.add_argument(
        "--validate",
        action="store_true",
        help="run the ONNX checker on every graph (ONNX Runtime's checks on ort-cpu stages)",
    )
    split.add_argument(
        "--target",
        choices=STAGE_TARGETS,
        default=TARGET_TENSORRT,
        help=f"runtime the layer stages are built for: {TARGET_TENSORRT} (default; standard ONNX ops that "
        f"TensorRT, moedge-run and every ONNX Runtime run) or {TARGET_ORT_CPU} (ONNX Runtime's fused CPU "
        "kernels: GroupQueryAttention with an in-place KV cache, consecutive dense layers joined into one "
        "graph; head size a multiple of 16; refused otherwise, writing nothing)",
    )
    split.add_argument(
        "--experts-in-graph",
        action="store_true",
        help=f"with --target {TARGET_ORT_CPU}: build each MoE layer's gating and routed experts into its stage "
        "graph (ONNX If nodes run only the chosen experts), so MoE layers join into one graph like dense "
        "ones: no per-expert files, every expert on the CPU; such a bundle cannot use an expert cache, a "
        "GPU, simulated profiles or routing traces (moedge run --backend ort-cpu runs it)",
    )
    set_handler(split, SplitOptions, execute)


def execute(opts: SplitOptions) -> int:
    """Cut an exported folder into a bundle (stages, one graph per expert, manifest.json)."""
    from moedge.graph_passes.bundle import split_bundle

    manifest = split_bundle(
        opts.export_dir,
        opts.output,
        validate=opts.validate,
        overwrite=opts.overwrite,
        target=opts.target,
        experts_in_graph=opts.experts_in_graph,
    )
    moe = [layer for layer in manifest.layers if layer.moe is not None]
    experts = sum(len(layer.moe.experts) for layer in moe if layer.moe is not None)
    in_graph = sum(
        layer.moe.num_experts for layer in moe if layer.moe is not None and layer.moe.experts_in_graph
    )
    runs = len(manifest.stage_runs())
    stages = f"{runs} layer stage" + ("s" if runs != 1 else "")
    if runs != len(manifest.layers):
        stages += f" for {len(manifest.layers)} layers"
    print(
        f"bundle {opts.output}: {stages}, {experts} expert graphs "
        + (f"({in_graph} experts inside the stage graphs) " if in_graph else "")
        + f"({manifest.expert_bytes() / 2**20:.1f} MiB of experts), precision {manifest.precision}, "
        f"stages for {manifest.stage_target}"
    )
    return EXIT_OK
