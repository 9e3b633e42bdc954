"""``export_model``: a loaded causal LM to an ONNX folder (``model.onnx`` + data, ``config.json``, ``tokenizer.json``)."""

from __future__ import annotations

import ast
import json
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
from moedge.export.configs import ArchitectureConfig, get_config
from moedge.model import LoadedModel
from moedge.module_names import CLASS_KEY, MODULE_KEY, experts_per_layer
from moedge.paths import OutputKind, atomic_folder, check_output_folder, ensure_writable_dir

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
EXPORT_FILES = ("config.json", MODEL_FILE, MODEL_FILE + ".data", "tokenizer.json", "routing.json")
"""Every file ``export_model`` writes (``routing.json`` only for a recipe that has one)."""
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


def _example_inputs(model: Any, arch: ArchitectureConfig, with_cache: bool) -> tuple[Any, ...]:
    import torch

    cfg = model.config
    batch, seq, past = 2, 3, 4  # distinct sizes so no dynamic axis is specialized or merged
    ids = torch.randint(0, int(cfg.vocab_size), (batch, seq), generator=torch.Generator().manual_seed(0))
    total = seq + (past if with_cache else 0)
    mask = torch.ones(batch, total, dtype=torch.int64)
    start = past if with_cache else 0
    pos = torch.arange(start, start + seq, dtype=torch.int64)[None].expand(batch, seq).contiguous()
    kv: list[torch.Tensor] = []
    if with_cache:
        shape = (batch, arch.num_kv_heads(cfg), past, arch.head_dim(cfg))
        kv = [torch.zeros(shape) for _ in range(2 * int(cfg.num_hidden_layers))]
    return (ids, mask, pos, *kv)


def _dynamic_shapes(num_layers: int, with_cache: bool) -> dict[str, Any]:
    from torch.export import Dim

    batch, seq, total, past = Dim("batch"), Dim("sequence"), Dim("total_sequence"), Dim("past_sequence")
    shapes: dict[str, Any] = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total if with_cache else seq},
        "position_ids": {0: batch, 1: seq},
    }
    if with_cache:
        shapes["past"] = tuple({0: batch, 2: past} for _ in range(2 * num_layers))
    return shapes


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


def _quant_summary(loaded: LoadedModel, report: Any) -> dict[str, Any]:
    recipe = loaded.provenance.get("recipe")
    method = None
    if recipe and (Path(recipe) / "recipe.json").is_file():
        method = json.loads((Path(recipe) / "recipe.json").read_text())["config"]["method"]
    return {
        "recipe": recipe,
        "method": method,
        "weights": "int8, per output channel, symmetric (DequantizeLinear axis 1, zero point 0)",
        "activations": "int8, per tensor, static, symmetric (QuantizeLinear/DequantizeLinear, zero point 0)",
        "quantized_linears": len(report.quantized),
        "float_linears": sorted(set(report.float_linears)),
    }


def _export_files(folder: Path) -> tuple[str, ...] | None:
    """The files of a previous export in ``folder`` (config.json with a ``moedge`` key and model.onnx)."""
    try:
        config = json.loads((folder / "config.json").read_text() or "{}")
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "moedge" not in config or not (folder / MODEL_FILE).is_file():
        return None
    return EXPORT_FILES


EXPORT_KIND = OutputKind("moedge export", _export_files)
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
    ONNX checker after each graph pass). The folder is
    written to a temporary sibling and moved into place, so a failure leaves nothing half-written.
    ``out_dir`` must be missing or empty; with ``overwrite`` it may also be a previous export holding
    nothing else, which the new one replaces in one swap (``check_export_output``).
    """
    import torch
    import transformers

    from moedge.export.patchers import fake_quant_as_linear, grouped_attention, per_expert_modules
    from moedge.export.wrapper import CausalLMExport, kv_names
    from moedge.graph_passes.insert_qdq import InsertQDQPass
    from moedge.graph_passes.pipeline import run_passes

    if opset < 17:
        raise MoedgeError(f"opset {opset} is too old: moedge exports opset 17 or newer")
    arch = get_config(loaded.model_type)
    out_dir = check_export_output(out_dir, overwrite=overwrite)
    model = loaded.model
    num_layers = int(model.config.num_hidden_layers)
    input_names = ["input_ids", "attention_mask", "position_ids"]
    output_names = ["logits"]
    if with_cache:
        input_names += kv_names(num_layers, "past_key_values")
        output_names += kv_names(num_layers, "present")

    start = time.perf_counter()
    with atomic_folder(out_dir, kind=EXPORT_KIND, replace=overwrite) as tmp:
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
                _example_inputs(model, arch, with_cache),
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(num_layers, with_cache),
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                verbose=False,
                optimize=False,  # onnxscript's rewriter takes hours on a 240-expert graph; ORT optimizes at load
            )
        if program is None:
            raise MoedgeError("torch.onnx.export returned no program")
        experts = _annotate_modules(program.model)
        if arch.is_moe:
            want = arch.num_experts(model.config)
            short = {layer: n for layer, n in experts.items() if n != want}
            if short or not experts:
                raise MoedgeError(
                    f"export lost experts: found {experts or 'none'}, expected {want} per layer"
                )
        qdq = None
        if quant:
            qdq = InsertQDQPass(quant)
            run_passes(program.model, [qdq], debug=validate)
        program.model.producer_name = "moedge"
        log.info("writing %s", out_dir / MODEL_FILE)
        program.save(str(tmp / MODEL_FILE), external_data=True)
        hf_config = model.config.to_dict()
        hf_config["moedge"] = {
            "format_version": EXPORT_FORMAT_VERSION,
            "kind": "monolithic",
            "architecture": arch.name,
            "with_cache": with_cache,
            "opset": opset,
            "inputs": input_names,
            "outputs": output_names,
            "num_layers": num_layers,
            "num_kv_heads": arch.num_kv_heads(model.config),
            "head_dim": arch.head_dim(model.config),
            "num_experts": arch.num_experts(model.config),
            "experts_per_layer": {str(k): v for k, v in experts.items()},
            "bos_token_id": loaded.bos_token_id,
            "eos_token_id": loaded.eos_token_id,
            "name": loaded.name,
            "source": loaded.source,
            "provenance": loaded.provenance,
            "precision": "w8a8" if qdq else "fp32",
            "quantization": None if qdq is None else _quant_summary(loaded, qdq.report),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, default=str))
        loaded.tokenizer.save(str(tmp / "tokenizer.json"))
        recipe = loaded.provenance.get("recipe")
        if qdq is not None and recipe and (Path(recipe) / "routing.json").is_file():
            shutil.copyfile(Path(recipe) / "routing.json", tmp / "routing.json")
    seconds = time.perf_counter() - start
    log.info("exported %s in %.1f s", out_dir, seconds)
    return ExportResult(
        out_dir=out_dir,
        model_file=out_dir / MODEL_FILE,
        num_nodes=len(list(program.model.graph.all_nodes())),
        seconds=seconds,
        experts_per_layer=experts,
    )
