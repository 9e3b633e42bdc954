"""``export_model``: a loaded causal LM to an ONNX folder (``model.onnx`` + data, ``config.json``, ``tokenizer.json``)."""

from __future__ import annotations

import ast
import logging
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError
from moedge.arch import ArchitectureConfig, get_config
from moedge.formats.export_folder import (
    MODEL_FILE,
    TOKENIZER_FILE,
    previous_export_files,
    write_export_config,
)
from moedge.formats.graph_names import (
    CLASS_KEY,
    INPUT_NAMES,
    MODULE_KEY,
    PAST_PREFIX,
    PRESENT_PREFIX,
    experts_per_layer,
    kv_names,
)
from moedge.formats.recipe import RECIPE_FILE, Recipe, load_recipe
from moedge.formats.routing import ROUTING_FILE
from moedge.model import LoadedModel
from moedge.paths import OutputKind, atomic_folder, check_output_folder, ensure_writable_dir

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
_SLICE = re.compile(r"\.slice\([^)]*\)")


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it holds."""

    out_dir: Path
    model_file: Path
    num_nodes: int
    seconds: float
    experts_per_layer: dict[int, int]


def _annotate_modules(ir_model: Any) -> dict[int, int]:
    """Replace the exporter's bulky per-node debug metadata with ``moedge.module``/``moedge.class``.

    Returns, per MoE layer, how many distinct experts appear in the graph.
    """
    from moedge.export.wrapper import MODULE_PREFIX

    modules: list[str] = []
    for node in ir_model.graph.all_nodes():
        props = node.metadata_props
        scopes_text = props.get("pkg.torch.onnx.name_scopes")
        classes_text = props.get("pkg.torch.onnx.class_hierarchy")
        for key in [k for k in props if k.startswith("pkg.torch.onnx") or k == "namespace"]:
            del props[key]
        if not scopes_text:
            continue
        scopes = ast.literal_eval(scopes_text)
        classes = ast.literal_eval(classes_text) if classes_text else []
        # ModuleList slicing (``self.layers[: n]``) shows up as ``layers.slice(None, n, None).0``.
        module = _SLICE.sub("", scopes[-2]) if len(scopes) >= 2 else ""
        module = module[len(MODULE_PREFIX) + 1 :] if module.startswith(MODULE_PREFIX + ".") else ""
        props[MODULE_KEY] = module
        modules.append(module)
        if len(classes) >= 2:
            props[CLASS_KEY] = classes[-2]
    return experts_per_layer(modules)


class _NoTorchvisionNotice(logging.Filter):
    """Drop the exporter's "torchvision is not installed" notices (moedge never exports vision ops)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision" not in record.getMessage()


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    log_ = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _NoTorchvisionNotice()
    log_.addFilter(notice)
    try:
        yield
    finally:
        log_.removeFilter(notice)


@dataclass(frozen=True)
class _RecipeFacts:
    """What an export records of the recipe a fake-quant model was built from."""

    path: str | None
    method: str | None
    routing: Path | None
    tied: bool = False  # q/k/v and gate/up share one activation scale (calibration/tie.py)


def _recipe_facts(loaded: LoadedModel, recipe: Recipe | None) -> _RecipeFacts:
    """The recipe given to ``export_model``; else the one ``apply_recipe`` recorded in the provenance."""
    if recipe is not None:
        routing = recipe.path / ROUTING_FILE
        tied = bool(recipe.meta["config"].get("tie_input_scales"))
        return _RecipeFacts(str(recipe.path), recipe.method, routing if routing.is_file() else None, tied)
    folder = loaded.provenance.get("recipe")
    if not folder:
        return _RecipeFacts(None, None, None)
    method = load_recipe(folder).method if (Path(folder) / RECIPE_FILE).is_file() else None
    routing = Path(folder) / ROUTING_FILE
    return _RecipeFacts(folder, method, routing if routing.is_file() else None)


def _quant_summary(recipe: _RecipeFacts, report: Any) -> dict[str, Any]:
    return {
        "recipe": recipe.path,
        "method": recipe.method,
        "tied_input_scales": recipe.tied,
        "weights": "int8, per output channel, symmetric (DequantizeLinear axis 1, zero point 0)",
        "activations": "int8, per tensor, static, symmetric (QuantizeLinear/DequantizeLinear, zero point 0)",
        "quantized_linears": len(report.quantized),
        "float_linears": sorted(set(report.float_linears)),
        "rotated_inputs": sorted(set(report.rotated_inputs)),
        "input_rotation": (
            "normalised Hadamard, reshape + two small constant MatMuls before the input's QuantizeLinear"
            if report.rotated_inputs
            else None
        ),
    }


EXPORT_KIND = OutputKind("moedge export", previous_export_files)
"""An export folder: ``--overwrite`` replaces one that holds only the files an export writes."""


def check_export_output(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """The resolved export folder, or one clear error (before any model loads) when writing it could lose data.

    Refused: a path in a bundle, a file, a non-empty folder; with ``overwrite``, a non-empty folder
    only when it is a previous ``moedge export`` holding nothing else.
    """
    out = check_output_folder(Path(out_dir).expanduser().resolve(), kind=EXPORT_KIND, overwrite=overwrite)
    ensure_writable_dir(out.parent)
    return out


def export_model(
    loaded: LoadedModel,
    out_dir: str | Path,
    *,
    recipe: Recipe | None = None,
    with_cache: bool = True,
    opset: int = DEFAULT_OPSET,
    validate: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``loaded`` to ``out_dir`` as an exact FP32 ONNX graph that ONNX Runtime runs as-is.

    MoE experts are rewritten into one subgraph per expert (see ``per_expert_modules``) and every node
    carries ``moedge.module`` metadata, so later passes can cut the graph by module. A model with a
    recipe applied (``apply_recipe``) exports as a W8A8 QDQ graph (``InsertQDQPass``) whose float math
    is the fake-quant model's, and the recipe's ``routing.json`` travels with it (``validate`` runs the
    ONNX checker after each graph pass). Pass that ``recipe``; without it, the one ``apply_recipe``
    recorded in ``loaded.provenance`` is used. The folder is written to a temporary sibling and moved
    into place, so a failure leaves nothing half-written. ``out_dir`` must be missing or empty; with
    ``overwrite`` it may also be a previous export holding nothing else, which the new one replaces in
    one swap (``check_export_output``).
    """
    if opset < 17:
        raise MoedgeError(f"opset {opset} is too old: moedge exports opset 17 or newer")
    arch = get_config(loaded.model_type)
    out_dir = check_export_output(out_dir, overwrite=overwrite)
    num_layers = int(loaded.model.config.num_hidden_layers)
    start = time.perf_counter()
    with atomic_folder(out_dir, kind=EXPORT_KIND, replace=overwrite) as tmp:
        program, quant = _trace(loaded, arch, with_cache=with_cache, opset=opset)
        experts = _annotate_modules(program.model)
        _check_experts(arch, loaded.model.config, experts)
        qdq = _insert_qdq(program.model, quant, validate)
        program.model.producer_name = "moedge"
        log.info("writing %s", out_dir / MODEL_FILE)
        program.save(str(tmp / MODEL_FILE), external_data=True)
        facts = _recipe_facts(loaded, recipe) if qdq is not None else None
        meta = _export_meta(loaded, arch, num_layers, with_cache=with_cache, opset=opset, experts=experts)
        meta["precision"] = "w8a8" if qdq is not None else "fp32"
        meta["quantization"] = None if qdq is None or facts is None else _quant_summary(facts, qdq.report)
        meta["versions"] = _versions()
        write_export_config(tmp, loaded.model.config.to_dict(), meta)
        loaded.tokenizer.save(str(tmp / TOKENIZER_FILE))
        if facts is not None and facts.routing is not None:
            shutil.copyfile(facts.routing, tmp / ROUTING_FILE)
    seconds = time.perf_counter() - start
    log.info("exported %s in %.1f s", out_dir, seconds)
    return ExportResult(
        out_dir=out_dir,
        model_file=out_dir / MODEL_FILE,
        num_nodes=len(list(program.model.graph.all_nodes())),
        seconds=seconds,
        experts_per_layer=experts,
    )


def _io_names(num_layers: int, with_cache: bool) -> tuple[list[str], list[str]]:
    """The exported graph's input and output names, in order."""
    input_names = list(INPUT_NAMES)
    output_names = ["logits"]
    if with_cache:
        input_names += kv_names(num_layers, PAST_PREFIX)
        output_names += kv_names(num_layers, PRESENT_PREFIX)
    return input_names, output_names


def _trace(
    loaded: LoadedModel, arch: ArchitectureConfig, *, with_cache: bool, opset: int
) -> tuple[Any, dict[str, Any]]:
    """``torch.onnx.export`` (dynamo) of the patched model; returns the ONNX program and the int8 decisions."""
    import torch

    from moedge.arch.dummy_inputs import dynamic_shapes, example_inputs
    from moedge.arch.per_expert import per_expert_modules
    from moedge.export.patchers import fake_quant_as_linear, grouped_attention
    from moedge.export.wrapper import CausalLMExport

    model = loaded.model
    num_layers = int(model.config.num_hidden_layers)
    input_names, output_names = _io_names(num_layers, with_cache)
    with (
        per_expert_modules(model, arch),
        fake_quant_as_linear(model) as quant,
        grouped_attention(model),
        _quiet_exporter(),
        torch.no_grad(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        wrapper = CausalLMExport(model, with_cache=with_cache).eval()
        log.info("tracing %s (%s, %d layers) with torch.export", loaded.name, arch.name, num_layers)
        program = torch.onnx.export(
            wrapper,
            example_inputs(model.config, arch, with_cache),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(num_layers, with_cache),
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            verbose=False,
            optimize=False,  # onnxscript's rewriter takes hours on a 240-expert graph; ORT optimizes at load
        )
    if program is None:
        raise MoedgeError("torch.onnx.export returned no program")
    return program, quant


def _check_experts(arch: ArchitectureConfig, hf_config: Any, experts: dict[int, int]) -> None:
    """Refuse an MoE graph where some layer lost experts in the trace."""
    if not arch.is_moe:
        return
    want = arch.num_experts(hf_config)
    short = {layer: n for layer, n in experts.items() if n != want}
    if short or not experts:
        raise MoedgeError(f"export lost experts: found {experts or 'none'}, expected {want} per layer")


def _insert_qdq(ir_model: Any, quant: dict[str, Any], validate: bool) -> Any:
    """Turn the recipe's int8 decisions back into Q/DQ nodes; returns the pass (None for an FP model)."""
    if not quant:
        return None
    from moedge.graph_passes.insert_qdq import InsertQDQPass
    from moedge.graph_passes.pipeline import run_passes

    qdq = InsertQDQPass(quant)
    run_passes(ir_model, [qdq], debug=validate)
    return qdq


def _export_meta(
    loaded: LoadedModel,
    arch: ArchitectureConfig,
    num_layers: int,
    *,
    with_cache: bool,
    opset: int,
    experts: dict[int, int],
) -> dict[str, Any]:
    """The ``moedge`` section of ``config.json``, up to precision, quantization and versions."""
    cfg = loaded.model.config
    input_names, output_names = _io_names(num_layers, with_cache)
    return {
        "kind": "monolithic",
        "architecture": arch.name,
        "with_cache": with_cache,
        "opset": opset,
        "inputs": input_names,
        "outputs": output_names,
        "num_layers": num_layers,
        "num_kv_heads": arch.num_kv_heads(cfg),
        "head_dim": arch.head_dim(cfg),
        "num_experts": arch.num_experts(cfg),
        "experts_per_layer": {str(k): v for k, v in experts.items()},
        "bos_token_id": loaded.bos_token_id,
        "eos_token_id": loaded.eos_token_id,
        "name": loaded.name,
        "source": loaded.source,
        "provenance": loaded.provenance,
    }


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
