"""The C++ runtime on ort-cpu target bundles (`moedge split --target ort-cpu`): the Python runtime's bits.

An ort-cpu bundle's layer stages run ONNX Runtime's GroupQueryAttention with the KV cache updated in
place; tiny-llama's two dense layers are one stage (a span), tiny-mixtral has one stage per MoE layer.
`moedge-run` must give `BundleRunner`'s greedy ids and first-step logits bit for bit, also once its KV
buffers outgrow their first 256 positions, under ASan+UBSan too; a bad span or rotary table is one line
that says what the Python runtime says.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moedge._errors import MoedgeError
from moedge.formats.manifest import read_manifest, sha256_file
from moedge.graph_passes.bundle import split_bundle
from moedge.runtime import BundleRunner
from tests.integration.test_cpp import ASAN, PROMPTS, RELEASE, _parity, _run

ROTARY = "rotary_cache.npy"
RESPLIT = "re-split the bundle with moedge split --target ort-cpu"
SANITIZER = re.compile(r"AddressSanitizer|runtime error:|LeakSanitizer")
MUST = f"bundle file {ROTARY} must hold float32 (2, positions, head_dim / 2) cos/sin tables, got"
UNREADABLE = f"bundle file {ROTARY} is not a readable .npy cos/sin table"
OUTSIDE = "is not a relative path inside the bundle: re-split the bundle with moedge split"


@pytest.fixture(scope="module")
def ort_cpu_bundles(tiny_exports, qdq_bundle, tmp_path_factory):
    """kind -> the ort-cpu split of that tiny export ("qdq": of the qdq_bundle fixture's QDQ export)."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            export = qdq_bundle.parent / "export" if kind == "qdq" else tiny_exports(kind)
            out = tmp_path_factory.mktemp(f"ort-cpu-{kind}") / "bundle"
            split_bundle(export, out, target="ort-cpu", progress=False)
            made[kind] = out
        return made[kind]

    return get


def _prompt(length: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, 250, length)]


def test_the_split_is_what_these_tests_are_about(ort_cpu_bundles):
    llama, mixtral = read_manifest(ort_cpu_bundles("llama")), read_manifest(ort_cpu_bundles("mixtral"))
    assert llama.stage_target == mixtral.stage_target == "ort-cpu" and llama.rotary == ROTARY
    assert [(layer.stage is not None, layer.span) for layer in llama.layers] == [(True, 2), (False, 1)]
    assert all(layer.stage is not None and layer.moe is not None for layer in mixtral.layers)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_ort_cpu_bundle_matches_the_python_runtime(ort_cpu_bundles, tmp_path, kind):
    doc = _parity(ort_cpu_bundles(kind), tmp_path)
    assert doc["decode_tokens"] > 0
    assert doc["expert_runs"] == (doc["hits"] if kind == "mixtral" else 0)
    if kind == "mixtral":
        assert doc["expert_runs"] > 0


def test_kv_buffers_grow_past_their_first_capacity(ort_cpu_bundles, tiny_exports, tmp_path):
    # a 300-token prompt starts at 600 positions; a 100-token one starts at 256 and grows (to the
    # context, 512) on the 257th position, mid-decode: both keep every cached row
    context = json.loads((tiny_exports("llama") / "config.json").read_text())["max_position_embeddings"]
    assert context >= 512
    bundle = ort_cpu_bundles("llama")
    long = _parity(bundle, tmp_path, prompts=[_prompt(300, 1)], new_tokens=8)
    assert len(long["generations"][0]["token_ids"]) == 8
    (tmp_path / "grow").mkdir()
    grown = _parity(bundle, tmp_path / "grow", prompts=[_prompt(100, 2)], new_tokens=200)
    assert len(grown["generations"][0]["token_ids"]) == 200  # no early end: 299 positions cached


def test_qdq_ort_cpu_bundle_matches_the_python_runtime(ort_cpu_bundles, tmp_path):
    bundle = ort_cpu_bundles("qdq")
    manifest = read_manifest(bundle)
    assert manifest.precision == "w8a8" and manifest.stage_target == "ort-cpu"
    _parity(bundle, tmp_path)


def test_ort_cpu_parity_under_address_sanitizer(ort_cpu_bundles, tmp_path):
    (tmp_path / "moe").mkdir()
    _parity(ort_cpu_bundles("mixtral"), tmp_path / "moe", ASAN)
    (tmp_path / "grow").mkdir()  # a span of two layers, and buffers grown from 256 to 512 positions
    _parity(ort_cpu_bundles("llama"), tmp_path / "grow", ASAN, prompts=[_prompt(120, 3)], new_tokens=150)


# --- refusals: one line, the Python runtime's words ---------------------------------------------------


def _copy(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    shutil.copytree(src, dst)
    doc = json.loads((dst / "manifest.json").read_text())
    edit(doc)
    (dst / "manifest.json").write_text(json.dumps(doc, indent=1))
    return dst


def _set(**fields: Any) -> Callable[[dict[str, Any]], None]:
    """Set ``layers.<i>.<key>`` (``layers_1_stage=None``) or a top-level key; ``...`` deletes it."""

    def edit(doc: dict[str, Any]) -> None:
        for name, value in fields.items():
            parts = name.split("_", 2)
            node, key = (doc["layers"][int(parts[1])], parts[2]) if parts[0] == "layers" else (doc, name)
            if value is ...:
                del node[key]
            else:
                node[key] = value

    return edit


def _dense(doc: dict[str, Any]) -> None:
    """tiny-mixtral's layer 0 made dense, spanning layer 1 (which keeps its experts)."""
    doc["layers"][0].update(moe=None, span=2)
    doc["layers"][1]["stage"] = None


def _another_graph(doc: dict[str, Any]) -> None:
    doc["layers"][1]["stage"] = dict(doc["head"], file="stages/another.onnx")


SPAN_CASES = {
    "span-past-the-end": (
        "llama",
        _set(layers_0_span=3),
        "layers[0].span must be at most 2 (the layers from here on), got 3",
    ),
    "span-null": (
        "llama",
        _set(layers_0_span=None),
        "layers[0].span must be an integer in [1, 65536], got null",
    ),
    "span-string": (
        "llama",
        _set(layers_0_span="2"),
        "layers[0].span must be an integer in [1, 65536], got '2'",
    ),
    "span-zero": ("llama", _set(layers_0_span=0), "layers[0].span must be an integer in [1, 65536], got 0"),
    "stage-inside-a-span": (
        "llama",
        _another_graph,
        "layers[1].stage must be null (an earlier layer's stage spans this layer), got 'a graph'",
    ),
    "span-without-stage": (
        "llama",
        _set(layers_1_span=2),
        "layers[1].span must be 1 (the layer has no stage), got 2",
    ),
    "no-stage-no-span": (
        "mixtral",
        _set(layers_1_stage=None),
        "layers[1].stage must be a graph (no earlier layer's stage spans this layer), got null",
    ),
    "moe-span": ("mixtral", _set(layers_0_span=2), "layers[0].span must be 1 for an MoE layer, got 2"),
    "moe-inside-a-span": (
        "mixtral",
        _dense,
        "layers[1].moe must be null (a layer inside a span is dense), got 'an MoE layer'",
    ),
    "no-rotary": (
        "llama",
        _set(rotary=...),
        "rotary must be the cos/sin table file an ort-cpu bundle's stages read, got null",
    ),
    "target-null": (
        "llama",
        _set(stage_target=None),
        "stage_target must be 'tensorrt' or 'ort-cpu', got null",
    ),
    "rotary-outside": (
        "llama",
        _set(rotary="../rotary_cache.npy"),
        f"rotary '../rotary_cache.npy' {OUTSIDE}",
    ),
    "rotary-unlisted": ("llama", _set(rotary="stages/embedding.onnx.data.npy"), "is not listed under files"),
}


@pytest.mark.parametrize("case", list(SPAN_CASES))
def test_a_bad_span_or_target_is_the_python_runtimes_one_line(ort_cpu_bundles, tmp_path, case):
    kind, edit, message = SPAN_CASES[case]
    bundle = _copy(ort_cpu_bundles(kind), tmp_path / "bundle", edit)
    with pytest.raises(MoedgeError) as python:
        read_manifest(bundle)
    result = _run([str(bundle), "--ids", "1,2", "-n", "2", "--threads", "1"])
    assert result.returncode == 1 and message in str(python.value)
    assert result.stderr == f"moedge-run: error: {python.value}\n"


def _rotary_file(write: Callable[[Path], None]) -> Callable[[Path], None]:
    """Rewrite the bundle's rotary tables with ``write`` and record the new file (a re-hashing tamperer)."""

    def tamper(bundle: Path) -> None:
        write(bundle / ROTARY)
        doc = json.loads((bundle / "manifest.json").read_text())
        doc["files"][ROTARY] = {
            "sha256": sha256_file(bundle / ROTARY),
            "bytes": (bundle / ROTARY).stat().st_size,
        }
        (bundle / "manifest.json").write_text(json.dumps(doc, indent=1))

    return tamper


def _tables(path: Path) -> np.ndarray:
    return np.load(path)


def _header(text: str) -> bytes:
    body = text.encode() + b" " * (117 - len(text)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


ROTARY_CASES = {  # (tampering, moedge-run's message, whether the Python runtime says the same)
    "float64": (
        lambda p: np.save(p, _tables(p).astype(np.float64)),
        f"{MUST} float64 (2, 512, 8): " + RESPLIT,
        True,
    ),
    "three-tables": (
        lambda p: np.save(p, np.concatenate([_tables(p), _tables(p)[:1]])),
        f"{MUST} float32 (3, 512, 8): " + RESPLIT,
        True,
    ),
    "two-dims": (
        lambda p: np.save(p, _tables(p)[0]),
        f"{MUST} float32 (512, 8): " + RESPLIT,
        True,
    ),
    "wrong-head-dim": (
        lambda p: np.save(p, _tables(p)[:, :, :7]),
        f"{MUST} float32 (2, 512, 7) with head_dim 16: " + RESPLIT,
        False,  # the Python runtime leaves this one to ONNX Runtime
    ),
    "cut-short": (
        lambda p: p.write_bytes(p.read_bytes()[:-4]),
        f"bundle file {ROTARY} has 32892 bytes, its .npy header says 32896: " + RESPLIT,
        False,
    ),
    "extra-key": (
        lambda p: p.write_bytes(
            _header("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 512, 8), 'x': 1, }")
            + b"\0" * 32768
        ),
        f"{UNREADABLE} (its header is not a numpy array header): " + RESPLIT,
        False,
    ),
    "version-9": (
        lambda p: p.write_bytes(b"\x93NUMPY\x09\x00" + p.read_bytes()[8:]),
        f"{UNREADABLE} (.npy format version 9.0): " + RESPLIT,
        False,
    ),
    "not-npy": (
        lambda p: p.write_bytes(b"not a .npy file " * 8),
        f"{UNREADABLE} (no .npy magic): " + RESPLIT,
        False,
    ),
}


@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_a_bad_rotary_table_is_one_line(ort_cpu_bundles, tmp_path, case):
    write, message, same = ROTARY_CASES[case]
    bundle = _copy(ort_cpu_bundles("llama"), tmp_path / "bundle", lambda doc: None)
    _rotary_file(write)(bundle)
    for build in (RELEASE, ASAN):
        result = _run([str(bundle), "--ids", "1,2", "--threads", "1"], build)
        assert (result.returncode, result.stderr) == (1, f"moedge-run: error: {message}\n")
        assert not SANITIZER.search(result.stderr)
    if same:  # the Python runtime reads the tables on its first step
        with pytest.raises(MoedgeError) as python:
            BundleRunner(bundle).forward(np.asarray([PROMPTS[0]]))
        assert str(python.value) == message
