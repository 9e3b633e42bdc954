"""Calibration on tiny models: exact folding, unchanged routers, recipe round trip, HAQ vs rtn, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from moedge._errors import MoedgeError
from moedge.arch import get_config
from moedge.arch.per_expert import split_experts
from moedge.calibration import CalibrationConfig, apply_recipe, calibrate, save_recipe
from moedge.calibration.layers import decoder_layers, layer_spec
from moedge.formats.recipe import load_recipe
from moedge.testbeds import build_tiny
from tests.conftest import TINY_KINDS


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, length)))


def _samples(n: int = 8, length: int = 48, seed: int = 0) -> list[np.ndarray]:
    return list(_ids(n, length, seed).numpy())


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_folding_every_group_is_exact_and_routers_are_unchanged(kind):
    loaded = build_tiny(kind)
    model = loaded.model
    ids = _ids(2, 24, 1)
    want = _logits(model, ids)
    router_out: dict[str, list[torch.Tensor]] = {"before": [], "after": []}
    split_experts(model, get_config(loaded.model_type))
    g = torch.Generator().manual_seed(0)
    groups = 0
    for index in range(len(decoder_layers(model))):
        spec = layer_spec(model, index)
        for group in spec.groups:
            s = torch.exp(torch.randn(group.channels, generator=g) * 1.5)  # scales from ~0.01 to ~100
            group.fold(s, spec.linears)
            groups += 1
    routers = [
        m for n, m in model.named_modules() if n.endswith("mlp.gate") and not isinstance(m, torch.nn.Linear)
    ]
    got = _logits(model, ids)
    assert groups >= 4 * len(decoder_layers(model))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if routers:  # the router logits themselves (not only the model output) are unchanged
        fresh = build_tiny(kind).model
        fresh_routers = [m for n, m in fresh.named_modules() if n.endswith("mlp.gate")]
        for name, hooks_on in (("before", fresh_routers), ("after", routers)):
            handles = [
                r.register_forward_hook(lambda _m, _a, out, k=name: router_out[k].append(out[0]))
                for r in hooks_on
            ]
            _logits(fresh if name == "before" else model, ids)
            for h in handles:
                h.remove()
        for a, b in zip(router_out["before"], router_out["after"], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe", "opt"])
def test_recipe_round_trips_exactly(kind, tmp_path):
    loaded = build_tiny(kind)
    result = calibrate(loaded, _samples(), CalibrationConfig(method="haq"), progress=False)
    ids = _ids(2, 32, 7)
    want = _logits(loaded.model, ids)
    out = save_recipe(loaded, result, tmp_path / "recipe")
    meta = json.loads((out / "recipe.json").read_text())
    assert meta["config"]["method"] == "haq" and meta["model"]["model_type"] == loaded.model_type
    quantized = [n for n, r in meta["linears"].items() if r["quantized"]]
    assert quantized and all("gate" not in n.rsplit(".", 1)[-1] or "proj" in n for n in quantized)
    assert (out / "routing.json").exists() == (kind != "opt")
    fresh = apply_recipe(build_tiny(kind), out)
    assert torch.equal(_logits(fresh.model, ids), want)
    assert not torch.allclose(_logits(build_tiny(kind).model, ids), want)  # the recipe changed the model


def test_routing_statistics_are_consistent(tmp_path):
    loaded = build_tiny("olmoe")
    result = calibrate(loaded, _samples(4, 32), CalibrationConfig(method="rtn"), progress=False)
    routing = result.routing
    assert routing is not None
    k, tokens = routing["top_k"], 4 * 32
    for counts in routing["expert_token_counts"].values():
        assert sum(counts) == k * tokens
    for matrix in routing["transition_counts"].values():
        assert int(np.sum(matrix)) == k * k * tokens
    paths = routing["top1_paths"]["most_common"]
    assert len(paths[0]["path"]) == len(routing["layers"]) and sum(p["count"] for p in paths) <= tokens


def test_calibration_is_deterministic():
    a, b = build_tiny("mixtral"), build_tiny("mixtral")
    ra = calibrate(a, _samples(), CalibrationConfig(method="haq", seed=3), progress=False)
    rb = calibrate(b, _samples(), CalibrationConfig(method="haq", seed=3), progress=False)
    assert ra.smoothing == rb.smoothing
    ids = _ids(1, 16, 9)
    assert torch.equal(_logits(a.model, ids), _logits(b.model, ids))


def _inject_outliers(model: torch.nn.Module, channels: tuple[int, ...], factor: float = 50.0) -> None:
    """Function-preserving: a norm channel x factor, the consuming weight columns / factor."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            for norm, consumers in (
                (
                    layer.input_layernorm,
                    [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                ),
                (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
            ):
                for c in channels:
                    norm.weight[c] *= factor
                    for lin in consumers:
                        lin.weight[:, c] /= factor


def _kl_to(reference: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(reference, -1)
    q = torch.log_softmax(logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_haq_beats_rtn_on_injected_outliers():
    base = build_tiny("llama")
    _inject_outliers(base.model, (3, 17, 40))
    ids = _ids(4, 64, 11)
    reference = _logits(base.model, ids)
    kl = {}
    for method in ("rtn", "smoothquant", "haq"):
        loaded = build_tiny("llama")
        _inject_outliers(loaded.model, (3, 17, 40))
        torch.testing.assert_close(_logits(loaded.model, ids), reference)  # the injection is exact
        # the methods as published: no rotation (which would spread the outlier channels for all three)
        cfg = CalibrationConfig(method=method, rotate="none")
        calibrate(loaded, _samples(16, 64), cfg, progress=False)
        kl[method] = _kl_to(reference, _logits(loaded.model, ids))
    assert kl["haq"] < 0.5 * kl["rtn"], kl
    assert kl["haq"] <= kl["smoothquant"] * 1.05, kl


def test_keep_fp_patterns_and_auto_mode():
    loaded = build_tiny("llama")
    cfg = CalibrationConfig(method="rtn", keep_fp=("*.layers.0.mlp.down_proj",), auto_keep_fp=0.05)
    result = calibrate(loaded, _samples(), cfg, progress=False)
    assert "model.layers.0.mlp.down_proj" in result.kept_fp
    auto = [n for n in result.kept_fp if n != "model.layers.0.mlp.down_proj"]
    params = sum(r.params for r in result.linears.values())
    assert auto and sum(result.linears[n].params for n in auto) <= 0.05 * params
    assert isinstance(loaded.model.get_submodule("model.layers.0.mlp.down_proj"), torch.nn.Linear)
    assert all(not result.linears[n].quantized for n in result.kept_fp)


def test_an_expert_no_token_reaches_gets_a_warning(caplog):
    loaded = build_tiny("olmoe")  # 8 experts, top-2: one 2-token sequence reaches at most 4 of them
    with caplog.at_level(logging.WARNING, logger="moedge.calibration.calibrator"):
        result = calibrate(loaded, [np.array([5, 9])], CalibrationConfig(method="haq"), progress=False)
    assert "no calibration token was routed" in caplog.text
    idle = [n for n, r in result.linears.items() if r.tokens == 0]
    assert idle and all(result.linears[n].quantized for n in idle)
    assert torch.isfinite(_logits(loaded.model, _ids(1, 8, 0))).all()


def test_recipe_for_another_model_is_refused(tmp_path):
    loaded = build_tiny("llama")
    result = calibrate(loaded, _samples(2, 16), CalibrationConfig(method="rtn"), progress=False)
    out = save_recipe(loaded, result, tmp_path / "r")
    with pytest.raises(MoedgeError, match="was made for"):
        apply_recipe(build_tiny("mistral"), out)
    (out / "recipe.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(MoedgeError, match="format version 99"):
        load_recipe(out)
    with pytest.raises(MoedgeError, match="not a recipe folder"):
        load_recipe(tmp_path)


def test_bad_calibration_input_is_refused():
    loaded = build_tiny("llama")
    with pytest.raises(MoedgeError, match="no calibration data"):
        calibrate(loaded, [], progress=False)
    with pytest.raises(MoedgeError, match="token ids must be in"):
        calibrate(loaded, [np.array([1, 2, 999])], progress=False)
    with pytest.raises(MoedgeError, match="unknown method"):
        CalibrationConfig(method="awq")
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(MoedgeError, match="NaN or Inf"):
        calibrate(loaded, _samples(2, 16), progress=False)
    overflow = build_tiny("llama")
    with torch.no_grad():
        overflow.model.model.layers[0].post_attention_layernorm.weight.fill_(3e38)
    with pytest.raises(MoedgeError, match="non-finite activations"):
        calibrate(overflow, _samples(2, 16), progress=False)


def test_architecture_without_a_smoothing_map_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    from moedge.model import LoadedModel
    from moedge.tokenizer import byte_level_tokenizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=258)).eval()
    loaded = LoadedModel(model=model, tokenizer=byte_level_tokenizer(), name="tiny-gpt2", source="test")
    with pytest.raises(MoedgeError, match="llama") as info:
        calibrate(loaded, _samples(1, 8), progress=False)
    assert "gpt2" in str(info.value)


def test_cli_calibrate_then_eval_with_the_recipe(tmp_path, capsys, data_dir):
    from moedge.cli import main

    out = tmp_path / "recipe"
    code = main(
        [
            *["-q", "calibrate", "stories260k", "-o", str(out), "--calib-data", "demo"],
            *["--calib-windows", "8", "--seqlen", "64", "--data-dir", str(data_dir), "--tie-input-scales"],
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "wrote" in printed and (out / "recipe.json").is_file()
    meta = json.loads((out / "recipe.json").read_text())
    assert meta["calibration_data"] == "demo" and meta["samples"] == 8 and meta["config"]["method"] == "haq"
    assert meta["config"]["tie_input_scales"] is True
    export = tmp_path / "export"
    code = main(
        ["-q", "export", "stories260k", "--recipe", str(out), "--tie-input-scales", "-o", str(export)]
    )
    assert code == 0
    assert json.loads((export / "config.json").read_text())["moedge"]["quantization"]["tied_input_scales"]
    ppl = {}
    for label, extra in (("fp", []), ("w8a8", ["--recipe", str(out)])):
        record = tmp_path / f"{label}.json"
        code = main(
            [
                *["-q", "eval", "stories260k", "--data", "demo", "--seqlen", "64", "--max-windows", "4"],
                *["--json", str(record), *extra],
            ]
        )
        assert code == 0
        ppl[label] = json.loads(record.read_text())["perplexity"]
    assert "fake-quant" in capsys.readouterr().out
    assert ppl["w8a8"] != ppl["fp"] and ppl["w8a8"] < 1.1 * ppl["fp"]


def test_cli_failures_leave_nothing_behind(tmp_path, capsys, data_dir):
    from moedge.cli import main

    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    out = tmp_path / "recipe"
    code = main(
        [
            *["-q", "calibrate", "stories260k", "-o", str(out), "--calib-data", str(short)],
            *["--data-dir", str(data_dir)],
        ]
    )
    assert code == 1 and "not more than one window" in capsys.readouterr().err
    broken = tmp_path / "broken-model"
    loaded = build_tiny("llama")
    with torch.no_grad():
        loaded.model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    loaded.model.save_pretrained(broken)
    loaded.tokenizer.save(str(broken / "tokenizer.json"))
    code = main(
        [
            *["-q", "calibrate", str(broken), "-o", str(out), "--calib-data", "demo", "--seqlen", "32"],
            *["--calib-windows", "2", "--data-dir", str(data_dir)],
        ]
    )
    assert code == 1 and "NaN or Inf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-model", "short.txt"]
    (out).mkdir()
    (out / "keep.txt").write_text("x")
    code = main(["-q", "calibrate", "stories260k", "-o", str(out), "--data-dir", str(data_dir)])
    assert code == 1 and "not an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["absmax", "percentile", "mse", "output"])
def test_every_activation_range_mode(mode):
    # A fixed, moderate smoothing strength keeps outliers in the inputs (a strength of 1.0 flattens every
    # channel to the same maximum, where clipping rightly stops paying), so the range search has work.
    loaded = build_tiny("llama")
    result = calibrate(
        loaded, _samples(4, 32), CalibrationConfig(method="haq", act_clip=mode, alpha=0.5), progress=False
    )
    ratios = [r.clip_ratio for r in result.linears.values() if r.quantized]
    assert all(r is not None and 0 < r <= 1 for r in ratios)
    if mode == "absmax":
        assert set(ratios) == {1.0}
    elif mode == "output":  # chosen by output error: never worse than the maximum's error
        plain = calibrate(
            build_tiny("llama"),
            _samples(4, 32),
            CalibrationConfig(method="haq", act_clip="absmax", alpha=0.5),
            progress=False,
        )
        assert sum(r.rel_error for r in result.linears.values()) <= sum(
            r.rel_error for r in plain.linears.values()
        )
    else:
        assert min(ratios) < 1.0  # the range was chosen, not copied from the maximum
    assert torch.isfinite(_logits(loaded.model, _ids(1, 16, 3))).all()


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_tied_input_scales_quantize_each_shared_input_once(kind, tmp_path):
    """--tie-input-scales: q/k/v share one scale, each FFN's gate/up another (the largest calibrated);
    the same tie applied to an untied recipe gives the same scales; an ort-cpu split packs every group."""
    import onnx

    from moedge.calibration.quant import FakeQuantLinear
    from moedge.calibration.tie import tie_groups, tie_input_scales, tie_recipe_scales
    from moedge.export.exporter import export_model
    from moedge.graph_passes.bundle import split_bundle

    loaded = build_tiny(kind)
    result = calibrate(loaded, _samples(), CalibrationConfig(method="haq"), progress=False)
    groups = tie_groups([n for n, r in result.linears.items() if r.quantized], loaded.model_type)
    layers = len(decoder_layers(loaded.model))
    ffns = layers * (get_config(loaded.model_type).num_experts(loaded.model.config) or 1)
    assert len(groups) == layers + ffns  # one q/k/v group per layer, one gate/up group per FFN
    modules = dict(loaded.model.named_modules())
    for group in groups:  # tiny models often calibrate equal scales: make the first of each larger
        first = modules[group[0]]
        assert isinstance(first, FakeQuantLinear)
        first.input_scale *= 1.5
        result.linears[group[0]].input_scale = first.input_scale
    untied = save_recipe(loaded, result, tmp_path / "untied")
    retied = tie_recipe_scales(load_recipe(untied))
    assert retied.meta["config"]["tie_input_scales"] is True
    assert json.loads((untied / "recipe.json").read_text())["config"]["tie_input_scales"] is False
    assert tie_input_scales(loaded.model, result, loaded.model_type) == sum(len(g) - 1 for g in groups)
    for group in groups:
        top = result.linears[group[0]].input_scale
        for name in group:
            assert result.linears[name].input_scale == top == modules[name].input_scale  # type: ignore[union-attr]
            assert retied.meta["linears"][name]["input_scale"] == top, name
        assert all(result.linears[n].untied_input_scale is not None for n in group[1:])
    export = export_model(apply_recipe(build_tiny(kind), retied), tmp_path / "export", recipe=retied)
    bundle = split_bundle(export.out_dir, tmp_path / "bundle", target="ort-cpu", progress=False)
    for run in bundle.stage_runs():
        ops = [n.op_type for n in onnx.load(str(tmp_path / "bundle" / run.stage.file)).graph.node]
        dense = sum(layer.moe is None for layer in run.layers)
        # per layer: q/k/v packed into one quantized matmul (+ o); a dense MLP's gate/up too (+ down)
        assert ops.count("QuantizeLinear") == 2 * len(run.layers) + 2 * dense, run.stage.file
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["moedge"]["quantization"]["tied_input_scales"] is True
    fresh = build_tiny(kind)  # the calibration option itself
    tied = calibrate(
        fresh, _samples(), CalibrationConfig(method="haq", tie_input_scales=True), progress=False
    )
    assert all(len({tied.linears[n].input_scale for n in g}) == 1 for g in groups)
