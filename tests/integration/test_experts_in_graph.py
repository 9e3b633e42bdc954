"""``moedge split --target ort-cpu --experts-in-graph``: each MoE layer's gating and experts inside its stage.

The in-graph bundle must compute what the runtime-dispatch ort-cpu bundle of the same export computes
(the same gating, experts run on their routed rows, combined in expert order: the same bits here),
through the Python runtime and ``moedge-run``; its manifest records the MoE layers without expert
files; ONNX Runtime must still fuse the W8A8 expert linears inside the ``If`` branches; and what needs
separate expert graphs refuses the bundle with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moedge._errors import MoedgeError
from moedge.formats.manifest import read_manifest
from moedge.graph_passes.bundle import split_bundle
from moedge.graph_passes.inspect import inspect_bundle
from moedge.runtime import BundleRunner, Generator, RoutingTrace
from moedge.runtime.decoding import StopRule, generate
from tests.integration.test_cpp import ASAN, _parity, _run

KINDS = ("mixtral", "qwen2-moe", "qdq")  # qdq: tiny-mixtral calibrated and exported W8A8
PROMPTS = [[1, 5, 9, 17, 33, 60, 2, 8], [2, 4, 6]]
REFUSED = "needs each expert as its own graph"


@pytest.fixture(scope="module")
def pair(tiny_exports, qdq_bundle, tmp_path_factory):
    """kind -> (runtime-dispatch ort-cpu bundle, in-graph ort-cpu bundle) of one export."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            export = qdq_bundle.parent / "export" if kind == "qdq" else tiny_exports(kind)
            root = tmp_path_factory.mktemp(f"in-graph-{kind}")
            split_bundle(export, root / "dispatch", target="ort-cpu", progress=False)
            split_bundle(export, root / "graph", target="ort-cpu", experts_in_graph=True, progress=False)
            made[kind] = (root / "dispatch", root / "graph")
        return made[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_the_manifest_records_in_graph_moe_layers_without_expert_files(kind, pair):
    dispatch, graph = (read_manifest(b) for b in pair(kind))
    assert graph.schema_version == 2 and dispatch.schema_version == 1
    assert graph.experts_in_graph and not dispatch.experts_in_graph
    assert [(layer.stage is not None, layer.span) for layer in graph.layers] == [
        (True, len(graph.layers))
    ] + [(False, 1)] * (len(graph.layers) - 1)
    for mine, theirs in zip(graph.layers, dispatch.layers, strict=True):
        assert mine.moe is not None and theirs.moe is not None
        assert mine.moe.experts_in_graph and mine.moe.experts == [] and mine.moe.router is None
        assert (mine.moe.num_experts, mine.moe.gating) == (theirs.moe.num_experts, theirs.moe.gating)
    assert graph.expert_bytes() == 0 and not any(f.startswith("experts/") for f in graph.files)
    lines = inspect_bundle(pair(kind)[1], ort_census_too=False)
    assert any("experts inside the stage graphs" in line for line in lines)
    # the experts' weights are stored once (a tiny model's graphs carry some more protobuf overhead)
    size = sum(e["bytes"] for e in graph.files.values())
    assert size < sum(e["bytes"] for e in dispatch.files.values()) + dispatch.expert_bytes() / 4


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_greedy_tokens_equal_the_runtime_dispatch_bundle(kind, pair):
    dispatch, graph = (BundleRunner(b) for b in pair(kind))
    ids = np.asarray([PROMPTS[0]])
    want, want_past = dispatch.forward(ids)
    got, past = graph.forward(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    token = int(want[0, -1].argmax())
    for _ in range(8):
        want, want_past = dispatch.forward(np.asarray([[token]]), past=want_past)
        got, past = graph.forward(np.asarray([[token]]), past=past)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert int(got[0, -1].argmax()) == int(want[0, -1].argmax())
        token = int(want[0, -1].argmax())
    stop = StopRule(max_new_tokens=12)
    batched = [g.token_ids for g in generate(graph, PROMPTS, stop)]  # several rows in one step
    assert batched == [g.token_ids for g in generate(dispatch, PROMPTS, stop)]


def test_ort_fuses_the_w8a8_expert_linears_inside_the_if_branches(pair, tmp_path):
    _, graph = pair("qdq")
    stage = read_manifest(graph).layers[0].stage
    assert stage is not None
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graph / stage.file), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    branches = [
        a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch"
    ]
    layers = read_manifest(graph).layers
    assert len(branches) == sum(layer.moe.num_experts for layer in layers if layer.moe)
    for branch in branches:
        ops = [n.op_type for n in branch.node]
        assert ops.count("MatMulIntegerToFloat") == 3, ops  # gate, up, down: int8 kernels
        assert "DequantizeLinear" not in ops and "MatMul" not in ops, ops


def test_moedge_run_gives_the_python_runtimes_tokens_and_logits(pair, tmp_path):
    for kind in ("qdq", "qwen2-moe"):
        doc = _parity(pair(kind)[1], tmp_path)
        assert doc["expert_runs"] == 0 and doc["decode_tokens"] > 0
    _parity(pair("qdq")[1], tmp_path, ASAN, new_tokens=6)  # under ASan+UBSan (a leak or overflow fails)


def test_what_needs_separate_experts_refuses_the_bundle_with_one_line(pair, tmp_path):
    dispatch, graph = pair("mixtral")
    runner = BundleRunner(graph)
    with pytest.raises(MoedgeError, match=f"a routing trace {REFUSED}"):
        runner.forward(np.asarray([PROMPTS[0]]), trace=RoutingTrace())
    with pytest.raises(MoedgeError, match=REFUSED):
        runner.run_expert(0, 0, np.zeros((1, 8), np.float32))
    with pytest.raises(MoedgeError, match=f"--backend simulated .*{REFUSED}"):
        Generator(graph, backend="simulated")
    assert Generator(graph, backend="ort-cpu").generate([PROMPTS[0]], max_new_tokens=2)
    result = _run([str(graph), "--ids", "1,2,3", "--gpu-budget", "50%"])
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert REFUSED in result.stderr
    with pytest.raises(MoedgeError, match="--experts-in-graph needs --target ort-cpu"):
        split_bundle(dispatch, tmp_path / "x", experts_in_graph=True)


def test_a_tampered_or_older_schema_in_graph_manifest_is_one_clear_line(pair, tmp_path):
    _, graph = pair("mixtral")
    copy = tmp_path / "bundle"
    shutil.copytree(graph, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    for change, match in (
        (lambda r: r.update(schema_version=1), r"schema_version"),
        (lambda r: r["layers"][0]["moe"].update(experts_in_graph=False), r"num_experts=\d+ graphs"),
        (lambda r: r["layers"][1]["moe"].update(router="stages/x.npy"), r"layers\[1\]\.moe\.router"),
    ):
        bad = json.loads(json.dumps(raw))
        change(bad)
        (copy / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(MoedgeError, match=match):
            read_manifest(copy)
        result = _run([str(copy), "--ids", "1,2"])
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
