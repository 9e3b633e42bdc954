"""--rotate online on tiny models: what the recipe records, the round trip, both bundle targets equal to
the fake-quant model, ORT still fusing every quantized linear, the outlier it exists for, refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.arch import get_config
from moedge.arch.per_expert import split_experts
from moedge.calibration import CalibrationConfig, apply_recipe, calibrate, save_recipe
from moedge.calibration.layers import decoder_layers, layer_spec
from moedge.calibration.rotation import OnlineHadamard, input_rotation
from moedge.export.exporter import export_model
from moedge.formats.manifest import read_manifest
from moedge.graph_passes.bundle import split_bundle
from moedge.graph_passes.check_tensorrt import check_tensorrt_ready
from moedge.runtime.bundle_runner import BundleRunner
from moedge.testbeds import build_tiny

SAMPLES = list(np.random.default_rng(0).integers(0, 256, (4, 32)))
IDS = np.random.default_rng(3).integers(0, 256, (2, 20))


def _logits(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def _build(kind: str):
    """A tiny model; ``llama-dct``: tiny-llama with every MLP 112 wide (8 x 14: no Hadamard matrix, so
    the online rotation takes a DCT factor)."""
    if kind != "llama-dct":
        return build_tiny(kind)
    from transformers.models.llama.modeling_llama import LlamaMLP

    loaded = build_tiny("llama")
    config = loaded.model.config
    config.intermediate_size = 7 * 16
    gen = torch.Generator().manual_seed(5)
    for layer in decoder_layers(loaded.model):
        layer.mlp = LlamaMLP(config)
        with torch.no_grad():
            for param in layer.mlp.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.08)
    return loaded


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2-moe", "opt", "llama-dct"])
def test_online_rotation_from_recipe_to_both_bundle_targets(kind, tmp_path):
    loaded = _build(kind)
    result = calibrate(loaded, SAMPLES, CalibrationConfig(method="rtn", rotate="online"), progress=False)
    want = _logits(loaded.model, IDS)
    # every MLP's last linear (dense, each routed expert, the shared expert) and nothing else
    outputs = set()
    for index, layer in enumerate(decoder_layers(loaded.model)):
        prefix = f"{next(n for n, m in loaded.model.named_modules() if m is layer)}."
        outputs |= {prefix + n for n in layer_spec(loaded.model, index).mlp_outputs}
    rotated = {n for n, r in result.linears.items() if r.input_rotation}
    assert rotated == outputs and len(outputs) >= 2
    for name in rotated:
        width = loaded.model.get_submodule(name).in_features
        assert result.linears[name].input_rotation == OnlineHadamard(width).name
    save_recipe(loaded, result, tmp_path / "recipe")
    meta = json.loads((tmp_path / "recipe" / "recipe.json").read_text())
    assert meta["config"]["rotate"] == "online"
    assert ("dct" in OnlineHadamard(112).name) and (kind == "llama-dct") == any(
        "dct" in str(r.input_rotation) for r in result.linears.values()
    )
    again = apply_recipe(_build(kind), tmp_path / "recipe")
    np.testing.assert_array_equal(_logits(again.model, IDS), want)
    export_model(again, tmp_path / "export")
    summary = json.loads((tmp_path / "export" / "config.json").read_text())["moedge"]["quantization"]
    assert set(summary["rotated_inputs"]) == rotated
    assert not any(n.endswith(".rotation") for n in summary["float_linears"])
    for target in ("tensorrt",) if kind == "opt" else ("tensorrt", "ort-cpu"):  # OPT: no RoPE to fuse
        out = tmp_path / target
        split_bundle(tmp_path / "export", out, target=target, progress=False, validate=True)
        assert set(read_manifest(out).quantization["rotated_inputs"]) == rotated  # type: ignore[index]
        _assert_matches_fake_quant(BundleRunner(out).forward(IDS)[0], want, f"{kind} {target}")
    for graph in sorted((tmp_path / "tensorrt").rglob("*.onnx")):
        assert check_tensorrt_ready(ir.load(str(graph))) == [], graph.name


def _assert_matches_fake_quant(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal to float noise, except that float32 ulps (the graph's rotation and the fake-quant model's
    sum in another order) may move an activation across an int8 rounding boundary: that token's logits
    (and the ones after it) then move by about one quantization step. A wrong rotation moves them all."""
    scale = float(np.abs(want).max())
    off_rows = (np.abs(got - want) > 1e-4 * scale).any(axis=-1)
    worst = float(np.abs(got - want).max()) / scale
    print(
        f"{what}: token rows beyond float noise {int(off_rows.sum())} of {off_rows.size}; max error {worst:.2e}"
    )
    assert off_rows.mean() <= 0.25 and worst < 0.05, (what, int(off_rows.sum()), worst)


def test_ort_cpu_still_runs_every_quantized_linear_as_an_int8_kernel(tmp_path):
    loaded = build_tiny("llama")
    result = calibrate(loaded, SAMPLES, CalibrationConfig(method="rtn", rotate="online"), progress=False)
    save_recipe(loaded, result, tmp_path / "recipe")
    export_model(apply_recipe(build_tiny("llama"), tmp_path / "recipe"), tmp_path / "export")
    bundle = split_bundle(tmp_path / "export", tmp_path / "cpu", target="ort-cpu", progress=False)
    for run in bundle.stage_runs():
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(
            str(tmp_path / "cpu" / run.stage.file), options, providers=["CPUExecutionProvider"]
        )
        ops = Counter(
            n.op_type
            for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node
        )
        layers = len(run.layers)
        # q/k/v and gate/up packed (rtn ties nothing here, but the tiny model's scales are equal), o, down
        assert ops["MatMulIntegerToFloat"] == ops["QuantizeLinear"] >= 3 * layers, ops
        assert ops["MatMul"] == 2 * layers  # the two constant factors of each down_proj rotation, in FP
        assert "DequantizeLinear" not in ops


def _outlier_mlp(kind: str) -> tuple[object, str]:
    """A tiny model whose layer-0 down_proj input has one channel 300x the rest (function unchanged)."""
    loaded = build_tiny(kind)
    mlp: nn.Module = decoder_layers(loaded.model)[0].mlp  # type: ignore[assignment]
    with torch.no_grad():
        mlp.up_proj.weight[5] *= 300.0  # type: ignore[index, union-attr]
        mlp.down_proj.weight[:, 5] /= 300.0  # type: ignore[index, union-attr]
    return loaded, "model.layers.0.mlp.down_proj"


def test_the_rotation_absorbs_a_massive_channel_that_a_static_scale_cannot():
    errors = {}
    for rotate in ("none", "online"):
        loaded, name = _outlier_mlp("llama")
        result = calibrate(loaded, SAMPLES, CalibrationConfig(method="rtn", rotate=rotate), progress=False)
        errors[rotate] = result.linears[name].rel_error
        spike = result.linears[name].input_absmax
        errors[f"{rotate}-absmax"] = spike
    assert errors["online"] < 0.2 * errors["none"], errors
    assert errors["online-absmax"] < 0.5 * errors["none-absmax"], errors


def test_a_width_without_a_rotation_is_refused_before_calibrating(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaMLP

    loaded = build_tiny("llama")
    config = loaded.model.config
    config.intermediate_size = 2 * 257  # an odd part above MAX_FACTOR
    decoder_layers(loaded.model)[1].mlp = LlamaMLP(config)
    calls: list[int] = []
    import moedge.calibration.calibrator as calibrator

    monkeypatch.setattr(calibrator, "_capture_inputs", lambda *a, **k: calls.append(1) or [])
    with pytest.raises(MoedgeError, match=r"layer 1 mlp.down_proj: no online rotation of width 514"):
        calibrate(loaded, SAMPLES, CalibrationConfig(rotate="online"), progress=False)
    assert not calls


def test_the_cli_records_the_rotation(tmp_path, capsys):
    from moedge.cli import main

    code = main(
        [
            "calibrate",
            "tiny-llama",
            "--method",
            "rtn",
            "--rotate",
            "online",
            "--calib-data",
            "demo",
            "--calib-windows",
            "2",
            "--seqlen",
            "32",
            "-o",
            str(tmp_path / "r"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert meta["config"]["rotate"] == "online"
    assert {n for n, r in meta["linears"].items() if r.get("input_rotation")} == {
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }
    code = main(["calibrate", "tiny-llama", "--rotate", "both", "-o", str(tmp_path / "x")])
    assert code == 2 and not Path(tmp_path / "x").exists()


def _odd_mlp(loaded, layer: int) -> None:
    """Give ``layer`` an MLP 514 wide (2 x 257: no online rotation here)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = loaded.model.config
    config.intermediate_size = 2 * 257
    decoder_layers(loaded.model)[layer].mlp = LlamaMLP(config)


def test_auto_rotation_is_the_most_the_model_allows_and_the_recipe_records_the_choice(tmp_path):
    from moedge.calibration.rotate_layer import choose_rotation

    for kind in ("llama", "qwen2-moe"):
        loaded = build_tiny(kind)
        split_experts(loaded.model, get_config(loaded.model_type))  # as calibrate() does first
        assert choose_rotation(loaded.model, loaded.model_type) == (
            "full",
            "every width has a Hadamard rotation",
        )
    odd = build_tiny("llama")
    _odd_mlp(odd, 1)
    choice, why = choose_rotation(odd.model, odd.model_type, odd.name)
    assert choice == "offline" and "layer 1 mlp.down_proj: no online rotation of width 514" in why
    opt = build_tiny("opt")
    choice, why = choose_rotation(opt.model, opt.model_type, opt.name)
    assert choice == "online" and "OPT is not rotation-invariant" in why

    result = calibrate(odd, SAMPLES, CalibrationConfig(method="rtn"), progress=False)
    assert result.config.rotate == "offline"  # the choice, not "auto", goes into the recipe
    assert input_rotation(decoder_layers(odd.model)[0].mlp.down_proj) is None
    save_recipe(odd, result, tmp_path / "r", calibration_data="random")
    assert json.loads((tmp_path / "r" / "recipe.json").read_text())["config"]["rotate"] == "offline"


def _token_specific_outliers(model: nn.Module, tokens: int = 16, scale: float = 40.0) -> None:
    """Token k < ``tokens`` lights up its own channel c_k of every layer's down_proj input: up_proj's row
    c_k (and gate_proj's, less) points along token k's embedding, and down_proj's column c_k shrinks by
    ``scale``. A per-channel smoothing scale cannot fix what moves from channel to channel per token."""
    emb = model.get_input_embeddings().weight.detach()  # type: ignore[operator]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in decoder_layers(model):
            mlp: Any = layer.mlp
            for k, c in enumerate(torch.randperm(mlp.up_proj.weight.shape[0], generator=g)[:tokens].tolist()):
                direction = emb[k] / emb[k].norm()
                mlp.up_proj.weight[c] = scale * direction
                mlp.gate_proj.weight[c] = 4.0 * direction
                mlp.down_proj.weight[:, c] /= scale


def test_rotated_haq_beats_haq_on_token_specific_outliers():
    ids = torch.from_numpy(np.random.default_rng(11).integers(0, 256, (4, 64)))
    samples = list(np.random.default_rng(0).integers(0, 256, (16, 64)))
    base = build_tiny("llama")
    _token_specific_outliers(base.model)
    seen: list[torch.Tensor] = []
    down = decoder_layers(base.model)[0].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().abs().flatten(0, -2)))
    with torch.no_grad():
        reference = base.model(input_ids=ids, use_cache=False).logits
    handle.remove()
    peaks = seen[0].argmax(-1)
    assert len(set(peaks.tolist())) >= 8  # the largest channel moves from token to token

    kl = {}
    for rotate in ("none", "online", "full"):
        loaded = build_tiny("llama")
        _token_specific_outliers(loaded.model)
        calibrate(loaded, samples, CalibrationConfig(method="haq", rotate=rotate), progress=False)
        with torch.no_grad():
            logits = loaded.model(input_ids=ids, use_cache=False).logits
        p, q = torch.log_softmax(reference, -1), torch.log_softmax(logits, -1)
        kl[rotate] = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl["online"] < 0.3 * kl["none"] and kl["full"] < 0.3 * kl["none"], kl
