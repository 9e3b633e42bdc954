"""--rotate offline and full on tiny models: what the recipe records and leaves out, the round trip from a
fresh model, the export, both bundle targets equal to the fake-quant model, --quantize-head on the
rotated stream (tied and untied), the CLI and a damaged recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from safetensors import safe_open
from torch import nn

import moedge.calibration.residual_rotation as residual_rotation
from moedge._errors import MoedgeError
from moedge.calibration import CalibrationConfig, apply_recipe, calibrate, save_recipe
from moedge.calibration.layers import head_modules
from moedge.calibration.recipe import model_fingerprint
from moedge.calibration.residual_rotation import RotatedFinalNorm
from moedge.export.exporter import export_model
from moedge.graph_passes.bundle import split_bundle
from moedge.graph_passes.check_tensorrt import check_tensorrt_ready
from moedge.runtime.bundle_runner import BundleRunner
from moedge.testbeds import build_tiny

SAMPLES = list(np.random.default_rng(0).integers(0, 256, (4, 32)))
IDS = np.random.default_rng(3).integers(0, 256, (2, 20))


def _logits(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def _tiny(kind: str, tied: bool):
    loaded = build_tiny(kind)
    if tied:  # as smollm2's head is
        loaded.model.lm_head.weight = loaded.model.get_input_embeddings().weight
        loaded.model.config.tie_word_embeddings = True
    return loaded


CASES = [
    # kind, rotate, method, --quantize-head, tied head, p x q layout of the head's rotation (16: 4 x 16)
    ("llama", "offline", "smoothquant", True, True, 16),
    ("llama", "full", "rtn", False, False, None),
    ("qwen2-moe", "offline", "smoothquant", True, False, None),
    ("qwen2-moe", "full", "rtn", False, True, 16),
]


@pytest.mark.parametrize(("kind", "rotate", "method", "quantize_head", "tied", "max_factor"), CASES)
def test_residual_rotation_from_recipe_to_both_bundle_targets(
    kind, rotate, method, quantize_head, tied, max_factor, tmp_path, monkeypatch
):
    if max_factor is not None:  # a 64-wide stream is one 64 x 64 product otherwise: exercise the slices
        monkeypatch.setattr(residual_rotation, "MAX_FACTOR", max_factor)
    loaded = _tiny(kind, tied)
    fp_want = _logits(loaded.model, IDS)
    digest = model_fingerprint(loaded.model)["embedding_sha256"]
    config = CalibrationConfig(method=method, rotate=rotate, quantize_head=quantize_head, seed=5)
    result = calibrate(loaded, SAMPLES, config, progress=False)
    want = _logits(loaded.model, IDS)
    assert np.abs(want - fp_want).max() < 0.25 * np.abs(fp_want).max()  # W8A8 noise of a tiny random model
    norm = head_modules(loaded.model)[1]
    assert isinstance(norm, RotatedFinalNorm)
    if quantize_head:  # smoothing folded into the rotated final norm's weight (the head's input channels)
        assert result.linears["lm_head"].quantized
        assert not torch.equal(norm.weight, torch.ones_like(norm.weight))
    rotated = {n for n, r in result.linears.items() if r.input_rotation}
    assert bool(rotated) == (rotate == "full")

    save_recipe(loaded, result, tmp_path / "recipe")
    meta = json.loads((tmp_path / "recipe" / "recipe.json").read_text())
    assert meta["config"]["rotate"] == rotate and meta["config"]["seed"] == 5
    assert meta["residual_rotation"]["matrix"] == "random_hadamard"
    assert (meta["residual_rotation"]["order"], meta["residual_rotation"]["seed"]) == (64, 5)
    assert meta["model"]["embedding_sha256"] == digest  # the original table's, not E Q's
    with safe_open(str(tmp_path / "recipe" / "weights.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
    assert not any("embed" in k for k in keys)  # E Q is rebuilt from the seed, never stored
    assert {"model.norm.gain", "model.norm.weight"} <= keys
    assert ("lm_head.qweight" in keys) == quantize_head

    again = apply_recipe(_tiny(kind, tied), tmp_path / "recipe")
    np.testing.assert_array_equal(_logits(again.model, IDS), want)
    assert (again.model.lm_head.weight is again.model.get_input_embeddings().weight) == (
        tied and not quantize_head
    )
    export_model(again, tmp_path / "export")
    summary = json.loads((tmp_path / "export" / "config.json").read_text())["moedge"]["quantization"]
    assert set(summary["rotated_inputs"]) == rotated
    assert "model.norm" in summary["float_linears"]  # the head rotation's constant factors stay FP
    bundle: dict[str, np.ndarray] = {}
    for target in ("tensorrt", "ort-cpu"):
        out = tmp_path / target
        split_bundle(tmp_path / "export", out, target=target, progress=False, validate=True)
        head = onnx.load(str(out / "stages" / "head.onnx"), load_external_data=False)
        assert [v.name for v in head.graph.input] == ["hidden_states"]  # reads no other input's shape
        runner = BundleRunner(out)
        got = bundle[target] = runner.forward(IDS)[0]
        last = runner.forward(IDS, last_only=True)[0]  # the head on (batch, 1, hidden)
        assert np.abs(last[:, -1] - got[:, -1]).max() < 0.05 * np.abs(got).max()  # a flip at most
        if target == "ort-cpu" and tied and quantize_head:
            continue  # its embedding is the int8 head's codes (checked below): close, not equal
        _assert_matches_fake_quant(got, want, f"{kind} {rotate} {target}")
    if tied and quantize_head:  # the head's codes of (E Q) diag(s) serve as the rotated table
        embedding = onnx.load(
            str(tmp_path / "ort-cpu" / "stages" / "embedding.onnx"), load_external_data=False
        )
        tables = [t for t in embedding.graph.initializer if len(t.dims) == 2]
        assert [t.data_type for t in tables] == [onnx.TensorProto.INT8]
        error = np.abs(bundle["ort-cpu"] - bundle["tensorrt"]).max() / np.abs(bundle["tensorrt"]).max()
        print(f"int8 table against the FP32 table: max error {error:.2e}")
        assert error < 0.1
    for graph in sorted((tmp_path / "tensorrt").rglob("*.onnx")):
        assert check_tensorrt_ready(ir.load(str(graph))) == [], graph.name


def _assert_matches_fake_quant(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal to float noise, except that float32 ulps (the graph and the fake-quant model sum in another
    order) may move an activation across an int8 rounding boundary: that token's logits, and through
    attention every later token's of its sequence, then move by about one quantization step (one flip
    early in one of the two sequences moves up to half the rows). A wrong rotation moves every token,
    the first of each sequence too. (tests/integration/test_rotation.py's check, for flips that spread.)"""
    scale = float(np.abs(want).max())
    off_rows = (np.abs(got - want) > 1e-4 * scale).any(axis=-1)
    worst = float(np.abs(got - want).max()) / scale
    print(
        f"{what}: token rows beyond float noise {int(off_rows.sum())} of {off_rows.size}; max error {worst:.2e}"
    )
    assert not off_rows[:, 0].any() and off_rows.mean() <= 0.5 and worst < 0.05, (
        what,
        off_rows.astype(int).tolist(),
        worst,
    )


@pytest.mark.parametrize(("kind", "tied", "max_factor"), [("qwen2-moe", True, 16), ("olmoe", False, None)])
def test_a_rotated_fp_model_exports_and_splits_exactly(kind, tied, max_factor, tmp_path, monkeypatch):
    """No int8 rounding to flip: the bundle's logits are the rotated FP model's (and the original's)."""
    from moedge.arch import get_config
    from moedge.arch.per_expert import split_experts
    from moedge.calibration.residual_rotation import rotate_residual

    if max_factor is not None:
        monkeypatch.setattr(residual_rotation, "MAX_FACTOR", max_factor)
    loaded = _tiny(kind, tied)
    want = _logits(loaded.model, IDS)
    split_experts(loaded.model, get_config(loaded.model_type))
    rotate_residual(loaded.model, loaded.model_type, seed=2, name=loaded.name)
    np.testing.assert_allclose(_logits(loaded.model, IDS), want, atol=1e-4, rtol=0)
    export_model(loaded, tmp_path / "export")
    scale = float(np.abs(want).max())
    for target in ("tensorrt", "ort-cpu"):
        out = tmp_path / target
        split_bundle(tmp_path / "export", out, target=target, progress=False, validate=True)
        runner = BundleRunner(out)
        got = runner.forward(IDS)[0]
        assert np.abs(got - want).max() < 1e-4 * scale, (target, float(np.abs(got - want).max()))
        last = runner.forward(IDS, last_only=True)[0]
        assert np.abs(last[:, -1] - want[:, -1]).max() < 1e-4 * scale, target


def test_a_recipe_without_its_rotation_record_is_refused(tmp_path):
    loaded = build_tiny("llama")
    result = calibrate(loaded, SAMPLES, CalibrationConfig(method="rtn", rotate="offline"), progress=False)
    save_recipe(loaded, result, tmp_path / "recipe")
    path = tmp_path / "recipe" / "recipe.json"
    meta = json.loads(path.read_text())
    meta["residual_rotation"] = None
    path.write_text(json.dumps(meta))
    with pytest.raises(MoedgeError, match=r"config\.rotate is 'offline' but field residual_rotation is None"):
        apply_recipe(build_tiny("llama"), tmp_path / "recipe")
    meta["residual_rotation"] = {"matrix": "random_hadamard", "order": 128, "seed": 0}
    path.write_text(json.dumps(meta))
    with pytest.raises(MoedgeError, match="width 128; this model's is 64"):
        apply_recipe(build_tiny("llama"), tmp_path / "recipe")


def test_calibrating_opt_with_a_residual_rotation_is_refused_before_calibrating(monkeypatch):
    import moedge.calibration.calibrator as calibrator

    calls: list[int] = []
    monkeypatch.setattr(calibrator, "_capture_inputs", lambda *a, **k: calls.append(1) or [])
    for rotate in ("offline", "full"):
        with pytest.raises(MoedgeError, match=r"^tiny-opt: OPT is not rotation-invariant"):
            calibrate(build_tiny("opt"), SAMPLES, CalibrationConfig(rotate=rotate), progress=False)
    assert not calls


def test_the_cli_records_the_residual_rotation(tmp_path, capsys):
    from moedge.cli import main

    args = ["--calib-data", "demo", "--calib-windows", "2", "--seqlen", "32", "--seed", "4"]
    code = main(
        ["calibrate", "tiny-llama", "--method", "rtn", "--rotate", "full", *args, "-o", str(tmp_path / "r")]
    )
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert meta["config"]["rotate"] == "full"
    assert (meta["residual_rotation"]["order"], meta["residual_rotation"]["seed"]) == (64, 4)
    assert {n for n, r in meta["linears"].items() if r.get("input_rotation")} == {
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }
    code = main(["calibrate", "tiny-opt", "--rotate", "offline", *args, "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0 and "OPT is not rotation-invariant" in err and not Path(tmp_path / "x").exists()
