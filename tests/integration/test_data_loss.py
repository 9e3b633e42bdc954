"""No data loss: no command deletes or rewrites a file it did not write, nor writes inside a bundle.

Each refusal is checked as a user sees it (``moedge.cli.main`` in-process): exit code 1, one stderr
line, and the user's files byte for byte as before. Every case is also recorded in
``benchmarks/results/robustness/data_loss.json`` when the module ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from moedge.cli import main
from moedge.formats.manifest import read_manifest
from moedge.paths import TEMP_MARK, remove_stale_temps, write_text_atomic

SUMMARY = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "robustness" / "data_loss.json"
BUNDLE_HINT = "--update-bundle"

Record = Callable[[str, str, int, str], None]


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> Iterator[Record]:
    """Collect {surface, case, exit_code, line} rows; write the summary when the module ends."""
    rows: list[dict[str, object]] = []
    base = str(tmp_path_factory.getbasetemp())

    def add(surface: str, case: str, exit_code: int, line: str) -> None:
        line = line.replace(base, "<tmp>")  # the same text on every machine
        rows.append({"surface": surface, "case": case, "exit_code": exit_code, "line": line})

    yield add
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "generated_by": "pytest tests/integration/test_data_loss.py",
        "cases": rows,
        "counts": dict(Counter(str(r["surface"]) for r in rows)),
    }
    write_text_atomic(SUMMARY, json.dumps(summary, indent=1) + "\n")


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): file -> sha256, folder -> "dir"."""
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name)


def _refused(capsys, record: Record, surface: str, case: str, *argv: str) -> str:
    """Run the CLI; assert exit code 1 and exactly one stderr line; record and return that line."""
    code = main(list(argv))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    line = lines[0] if lines else ""
    record(surface, case, code, line)
    assert code == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return line


def _ok(capsys, record: Record, surface: str, case: str, *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    record(surface, case, code, lines[0] if lines else "")
    assert code == 0, err
    return out


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` points the root logger at this test's captured stderr: undo that after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals happen before any model loads: loading one fails the test."""

    def fail(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("moedge.loading.load_model", fail)


@pytest.fixture
def bundle(bundles, tmp_path) -> Path:
    """A private copy of tiny-mixtral's bundle (the session's bundle stays untouched)."""
    out = tmp_path / "bundle"
    shutil.copytree(bundles("mixtral"), out)
    return out


# --- export, split, calibrate: a non-empty output folder --------------------------------------------


def test_export_refuses_a_folder_holding_a_user_file(tmp_path, capsys, record, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"my notes\n")
    before = _tree(out)
    line = _refused(capsys, record, "export", "user file in -o", "export", "tiny-mixtral", "-o", str(out))
    assert "not an empty folder" in line and "--overwrite" in line
    line = _refused(
        capsys,
        record,
        "export",
        "--overwrite of a folder of user files",
        "export",
        "tiny-mixtral",
        "-o",
        str(out),
        "--overwrite",
    )
    assert "is not a moedge export" in line
    assert _tree(out) == before


def test_export_refuses_an_export_holding_a_bundle(
    tiny_exports, bundles, tmp_path, capsys, record, no_model_load
):
    out = tmp_path / "out"
    shutil.copytree(tiny_exports("mixtral"), out)  # config.json with its moedge key, model.onnx
    shutil.copytree(bundles("mixtral"), out / "bundle")
    before = _tree(out)
    line = _refused(
        capsys, record, "export", "bundle split into -o/bundle", "export", "tiny-mixtral", "-o", str(out)
    )
    assert "not an empty folder" in line
    line = _refused(
        capsys,
        record,
        "export",
        "--overwrite of an export holding a bundle",
        "export",
        "tiny-mixtral",
        "-o",
        str(out),
        "--overwrite",
    )
    assert "not part of a moedge export" in line and "bundle/" in line
    assert _tree(out) == before
    read_manifest(out / "bundle", verify=True)


def test_export_overwrite_replaces_a_previous_export(tiny_exports, tmp_path, capsys, record):
    out = tmp_path / "out"
    shutil.copytree(tiny_exports("mixtral"), out)
    (out / "config.json").write_text(json.dumps({"moedge": {"name": "older"}}))
    (tmp_path / "beside.txt").write_bytes(b"keep me")
    _ok(
        capsys,
        record,
        "export",
        "--overwrite of a previous export",
        "-q",
        "export",
        "tiny-mixtral",
        "-o",
        str(out),
        "--overwrite",
    )
    config = json.loads((out / "config.json").read_text())
    assert config["moedge"]["name"] == "tiny-mixtral"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
    ]
    assert _temps(tmp_path) == [] and (tmp_path / "beside.txt").read_bytes() == b"keep me"


def test_export_api_follows_the_same_rule(tiny_models, tmp_path):
    from moedge._errors import MoedgeError
    from moedge.export.exporter import export_model

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"not mine")
    with pytest.raises(MoedgeError, match="not an empty folder"):
        export_model(tiny_models("mixtral"), out)
    with pytest.raises(MoedgeError, match="not a moedge export"):
        export_model(tiny_models("mixtral"), out, overwrite=True)
    assert (out / "model.onnx").read_bytes() == b"not mine"


def test_split_and_calibrate_overwrite_only_their_own_output(
    tiny_exports, bundle, tmp_path, capsys, record, no_model_load
):
    export = str(tiny_exports("mixtral"))
    out = tmp_path / "again"
    shutil.copytree(bundle, out)
    _ok(
        capsys,
        record,
        "split",
        "--overwrite of a previous bundle",
        "-q",
        "split",
        export,
        "-o",
        str(out),
        "--overwrite",
    )
    read_manifest(out, verify=True)
    assert _temps(tmp_path) == []
    (out / "notes.txt").write_bytes(b"mine")
    before = _tree(out)
    line = _refused(
        capsys,
        record,
        "split",
        "--overwrite of a bundle holding a user file",
        "split",
        export,
        "-o",
        str(out),
        "--overwrite",
    )
    assert "notes.txt" in line and "not part of a moedge bundle" in line
    line = _refused(capsys, record, "split", "non-empty -o", "split", export, "-o", str(out))
    assert "not an empty folder" in line
    assert _tree(out) == before
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "weights.safetensors").write_bytes(b"someone else's")
    line = _refused(
        capsys,
        record,
        "calibrate",
        "--overwrite of a folder that is no recipe",
        "calibrate",
        "tiny-mixtral",
        "-o",
        str(recipe),
        "--overwrite",
    )
    assert "is not a moedge recipe" in line
    assert (recipe / "weights.safetensors").read_bytes() == b"someone else's"


# --- nothing writes inside a bundle -------------------------------------------------------------------


def _profile(bundle: Path, *extra: str) -> list[str]:
    return ["profile", str(bundle), "--text", "demo", "--tokens", "64", *extra]


@pytest.mark.parametrize(
    ("case", "argv"),
    [
        ("-o in the bundle", lambda b, o: _profile(b, "-o", str(b / "routing.json"))),
        (
            "--plan in the bundle",
            lambda b, o: _profile(b, "-o", str(o / "r.json"), "--plan", str(b / "plan.json")),
        ),
        (
            "--trace in the bundle",
            lambda b, o: _profile(b, "-o", str(o / "r.json"), "--trace", str(b / "t.npz")),
        ),
        (
            "--trace in the bundle with --update-bundle",
            lambda b, o: _profile(b, "--update-bundle", "--trace", str(b / "t.npz")),
        ),
        (
            "--plan over a graph with --update-bundle",
            lambda b, o: _profile(b, "--update-bundle", "--plan", str(b / "stages" / "head.onnx")),
        ),
        (
            "run --metrics-json in the bundle",
            lambda b, o: [
                "run",
                str(b),
                "--ids",
                "1,2,3",
                "-n",
                "2",
                "--backend",
                "ort-cpu",
                "--metrics-json",
                str(b / "m.json"),
            ],
        ),
        (
            "eval --json in the bundle",
            lambda b, o: ["eval", str(b), "--data", "demo", "--json", str(b / "sub" / "ppl.json")],
        ),
        ("build --engines in the bundle", lambda b, o: ["build", str(b), "--engines", str(b / "engines")]),
        ("export -o the bundle", lambda b, o: ["export", "tiny-mixtral", "-o", str(b)]),
        (
            "export --overwrite -o in the bundle",
            lambda b, o: ["export", "tiny-mixtral", "-o", str(b / "stages" / "x"), "--overwrite"],
        ),
        ("calibrate -o in the bundle", lambda b, o: ["calibrate", "tiny-mixtral", "-o", str(b / "recipe")]),
        ("split -o in the bundle", lambda b, o: ["split", str(o / "export"), "-o", str(b / "inner")]),
    ],
)
def test_nothing_writes_inside_a_bundle(
    case, argv, bundle, tiny_exports, tmp_path, capsys, record, no_model_load
):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "export").symlink_to(tiny_exports("mixtral"))
    before = _tree(bundle)
    args = argv(bundle, outside)
    line = _refused(capsys, record, args[0], case, *args)
    assert BUNDLE_HINT in line or "bundle's own files" in line, line
    assert _tree(bundle) == before
    read_manifest(bundle, verify=True)
    assert sorted(p.name for p in outside.iterdir()) == ["export"]  # refused before anything ran


def test_build_puts_engines_beside_the_bundle(bundle, capsys, record):
    from moedge.runtime.backends.tensorrt import default_engine_dir, graphs_fingerprint

    assert default_engine_dir(bundle) == bundle.parent / "bundle.engines"
    before = _tree(bundle)
    try:
        import tensorrt

        has_trt = hasattr(tensorrt, "Builder")
    except ImportError:
        has_trt = False
    if not has_trt:  # the default folder passes the bundle check; the missing TensorRT is the one error
        line = _refused(
            capsys, record, "build", "default engine folder without TensorRT", "build", str(bundle)
        )
        assert "TensorRT" in line and not default_engine_dir(bundle).exists()
    assert _tree(bundle) == before
    manifest = read_manifest(bundle)
    with_routing = replace(
        manifest, files={**manifest.files, "routing.json": {"sha256": "0" * 64, "bytes": 1}}
    )
    assert graphs_fingerprint(with_routing) == graphs_fingerprint(manifest)  # engines stay current


def test_profile_update_bundle_lists_routing_and_plan(bundle, capsys, record):
    _ok(
        capsys,
        record,
        "profile",
        "--update-bundle with a plan in the bundle",
        "-q",
        *_profile(bundle, "--update-bundle", "--plan", str(bundle / "plan.json")),
    )
    manifest = read_manifest(bundle, verify=True)
    assert manifest.routing == "routing.json" and manifest.extra["plan"] == "plan.json"
    assert {"routing.json", "plan.json"} <= set(manifest.files)
    first = (bundle / "routing.json").read_bytes()
    _ok(
        capsys,
        record,
        "profile",
        "--update-bundle again (replaces its own files)",
        "-q",
        *_profile(bundle, "--update-bundle", "--tokens", "80", "--plan", str(bundle / "plan.json")),
    )
    read_manifest(bundle, verify=True)
    assert (bundle / "routing.json").read_bytes() != first
    assert _temps(bundle) == [] and _temps(bundle.parent) == []


# --- temporary siblings and permissions ---------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _own_start() -> int:
    from moedge.paths import _start_time

    return _start_time(os.getpid()) or 0


def test_stale_temp_siblings_go_only_when_their_writer_is_gone(tiny_exports, tmp_path, capsys, record):
    target = tmp_path / "bundle"
    dead = tmp_path / f".bundle.{TEMP_MARK}-{_dead_pid()}-1-deadbeef"
    live = tmp_path / f".bundle.{TEMP_MARK}-{os.getpid()}-{_own_start()}-0badc0de"
    other = tmp_path / f".other.{TEMP_MARK}-{_dead_pid()}-1-deadbeef"  # another target's: not touched
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "part.onnx").write_bytes(b"half")
    if sys.platform.startswith("linux"):  # a live pid with another start time is a reused pid
        reused = tmp_path / f".bundle.{TEMP_MARK}-{os.getpid()}-{_own_start() + 1}-cafef00d"
        reused.mkdir()
    _ok(
        capsys,
        record,
        "temp-siblings",
        "split next to a dead writer's and a live writer's temp folders",
        "-q",
        "split",
        str(tiny_exports("mixtral")),
        "-o",
        str(target),
    )
    left = _temps(tmp_path)
    record("temp-siblings", "dead or reused-pid writer's temp folder removed", 0, "kept: " + ", ".join(left))
    assert left == sorted([live.name, other.name])
    # single files: the same rule
    routing = tmp_path / "routing.json"
    stale_file = tmp_path / f".routing.json.{TEMP_MARK}-{_dead_pid()}-1-feedface"
    stale_file.write_text("{")
    write_text_atomic(routing, "{}\n")
    record(
        "temp-siblings",
        "dead writer's temp file removed by the next write",
        0,
        f"removed: {not stale_file.exists()}",
    )
    assert not stale_file.exists() and routing.read_text() == "{}\n"
    assert remove_stale_temps(target) == []  # the live writer's folder stays


def test_outputs_follow_the_umask(tiny_exports, tmp_path, capsys, record):
    old = os.umask(0o022)
    try:
        bundle = tmp_path / "bundle"
        _ok(
            capsys,
            record,
            "umask",
            "split output with umask 022",
            "-q",
            "split",
            str(tiny_exports("mixtral")),
            "-o",
            str(bundle),
        )
        _ok(
            capsys,
            record,
            "umask",
            "profile -o with umask 022",
            "-q",
            *_profile(bundle, "-o", str(tmp_path / "routing.json"), "--plan", str(tmp_path / "plan.json")),
        )
    finally:
        os.umask(old)
    modes = {p: p.stat().st_mode & 0o777 for p in [bundle, *bundle.rglob("*")]}
    modes[tmp_path / "routing.json"] = (tmp_path / "routing.json").stat().st_mode & 0o777
    modes[tmp_path / "plan.json"] = (tmp_path / "plan.json").stat().st_mode & 0o777
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if p.is_dir() else 0o644)}
    assert not wrong
