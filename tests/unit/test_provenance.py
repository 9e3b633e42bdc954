"""benchmarks/provenance.py: the one writer of every benchmark JSON (issue 15).

The writer records real digests and the ORT actually imported, writes atomically, and no benchmark in
benchmarks/ writes JSON any other way.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import onnxruntime
import pytest

from benchmarks import provenance

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
# The benchmarks that write a JSON record; each must call write_result (a file leaving the list is a
# deliberate change here, not a silent one).
WRITERS = {
    "bundle_parity.py",
    "bundle_speed.py",
    "calibration_table.py",
    "cpp_runtime.py",
    "haq_spread_study.py",
    "mixed_precision_sensitivity.py",
    "quant_noise_floor.py",
    "rotation_probe.py",
    "runtime_bench.py",
    "testbed_report.py",
}


def _write(path: Path, **overrides: object) -> dict:
    kwargs: dict = {
        "benchmark": "unit",
        "command": ["python", "benchmarks/unit.py", "--flag"],
        "threads": 3,
        "inputs": [],
        "runs": [{"repeat": 0, "seconds": 1.5}, {"repeat": 1, "seconds": 1.25}],
        "statistic": "median of 2 repeats",
        "results": {"seconds": 1.375},
    }
    kwargs.update(overrides)
    return provenance.write_result(path, **kwargs)


def test_input_digests_are_the_files_sha256(tmp_path):
    data = os.urandom(3 * 2**20 + 17)  # several read chunks and a ragged tail
    blob = tmp_path / "weights.bin"
    blob.write_bytes(data)
    out = tmp_path / "results" / "unit.json"
    doc = _write(out, inputs=[blob, ROOT / "README.md"])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(doc))
    first, readme = written["inputs"]
    assert first["sha256"] == hashlib.sha256(data).hexdigest() and first["bytes"] == len(data)
    assert readme == {
        "path": "README.md",  # repository-relative
        "bytes": len((ROOT / "README.md").read_bytes()),
        "sha256": hashlib.sha256((ROOT / "README.md").read_bytes()).hexdigest(),
    }


def test_folder_digest_is_the_sorted_sha256sum_listing(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "bundle"
    (folder / "experts").mkdir(parents=True)
    files = {"manifest.json": b'{"a": 1}', "experts/e0.onnx": b"\x00" * 5000, "b.bin": b"xyz"}
    for rel, body in files.items():
        (folder / rel).write_bytes(body)
    listing = "".join(f"{hashlib.sha256(files[r]).hexdigest()}  {r}\n" for r in sorted(files))
    monkeypatch.setenv(provenance.DATA_ENV, str(tmp_path / "data"))
    got = provenance.file_digest(folder)
    assert got == {
        "path": f"${provenance.DATA_ENV}/bundle",
        "bytes": sum(len(b) for b in files.values()),
        "sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "files": 3,
    }
    (folder / "b.bin").write_bytes(b"xyZ")
    assert provenance.file_digest(folder)["sha256"] != got["sha256"]


def test_a_missing_input_is_recorded_not_fatal(tmp_path):
    doc = _write(tmp_path / "r.json", inputs=[tmp_path / "gone.bin"])
    assert doc["inputs"][0]["sha256"] is None and "gone.bin" in doc["inputs"][0]["error"]


def test_environment_names_the_onnxruntime_imported_and_the_machine():
    env = provenance.environment(threads=3, engines=("onnxruntime",))
    assert env["onnxruntime_imported"]["version"] == onnxruntime.__version__
    assert env["onnxruntime_imported"]["file"] == onnxruntime.__file__
    dists = {d: env["packages"][d] for d in ("onnxruntime", "onnxruntime-gpu") if env["packages"][d]}
    assert dists and all(v == importlib.metadata.version(d) for d, v in dists.items())
    assert onnxruntime.__version__ in dists.values()
    if hasattr(onnxruntime, "get_build_info"):
        assert env["build_flags"]["onnxruntime"] == str(onnxruntime.get_build_info())
    assert env["packages"]["numpy"] == importlib.metadata.version("numpy")
    assert env["python"] == platform.python_version()
    assert env["threads"] == 3 and env["logical_cpus"] == os.cpu_count()
    assert env["cpu_model"] and env["cpu_model"] != "unknown"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert env["moedge"]["commit"] == head.stdout.strip() and isinstance(env["moedge"]["dirty"], bool)


def test_commit_is_unknown_outside_a_git_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.moedge_commit() == {"commit": "unknown", "dirty": None}


def test_caller_build_flags_join_the_environment(tmp_path):
    doc = _write(tmp_path / "r.json", build_flags={"moedge-run": {"onnxruntime": "1.2.3"}})
    assert doc["environment"]["build_flags"]["moedge-run"] == {"onnxruntime": "1.2.3"}


def test_document_layout(tmp_path):
    out = tmp_path / "r.json"
    doc = _write(out)
    assert list(doc) == [
        "schema",
        "benchmark",
        "command",
        "created",
        "environment",
        "inputs",
        "statistic",
        "runs",
        "results",
    ]
    assert doc["schema"] == "moedge.benchmark/1" and doc["command"][1] == "benchmarks/unit.py"
    assert doc["created"].endswith("+00:00") and len(doc["runs"]) == 2
    assert out.read_text() == json.dumps(doc, indent=1) + "\n"
    assert provenance.read_result(out) == doc
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's private 0600


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    with pytest.raises(TypeError):  # serialisation fails: nothing is created
        _write(out, results={"figure": object()})
    assert list(tmp_path.iterdir()) == []
    _write(out)
    before = out.read_text()
    with pytest.raises(TypeError):
        _write(out, runs=[{"raw": object()}])
    assert out.read_text() == before and list(tmp_path.iterdir()) == [out]

    def fail(src, dst):
        assert Path(src).parent == tmp_path and Path(src).read_text().startswith("{")  # written beside it
        raise OSError("disk gone")

    monkeypatch.setattr(provenance.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        _write(out, results={"seconds": 9.0})
    assert out.read_text() == before and list(tmp_path.iterdir()) == [out]


def test_files_from_before_the_schema_read_as_results(tmp_path):
    legacy = tmp_path / "old.json"
    legacy.write_text(json.dumps({"model": "m", "rows": {"fp32": {}}}))
    assert provenance.read_result(legacy) == {
        "schema": None,
        "results": {"model": "m", "rows": {"fp32": {}}},
        "runs": [],
        "inputs": [],
    }
    assert provenance.results_of(tmp_path / "absent.json") is None
    blob = tmp_path / "w.bin"
    blob.write_bytes(b"w")
    doc = _write(tmp_path / "new.json", inputs=[blob], runs=[{"row": "a"}, {"row": "b"}])
    kept, earlier = provenance.carry_over(doc, lambda r: r["row"] != "b", [])
    assert kept == [{"row": "a"}] and earlier == doc["inputs"]
    assert provenance.carry_over(doc, lambda r: r["row"] != "b", [blob]) == ([{"row": "a"}], [])


# --- no benchmark writes JSON except through the writer ------------------------------------------------


def _json_writes(source: str) -> list[int]:
    """Lines that write JSON to a file: json.dump(...), or a .write/.write_text/.write_bytes call whose
    arguments hold a json.dumps(...) (printing one to stdout is fine)."""

    def is_json(call: ast.AST, name: str) -> bool:
        return (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == name
            and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "json"
        )

    lines = []
    for node in ast.walk(ast.parse(source)):
        if is_json(node, "dump"):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("write", "write_text", "write_bytes")
            and any(is_json(sub, "dumps") for arg in node.args for sub in ast.walk(arg))
        ):
            lines.append(node.lineno)
    return lines


def test_the_detector_catches_direct_json_writes():
    assert _json_writes("import json\njson.dump(doc, open('x.json', 'w'))\n") == [2]
    assert _json_writes("p.write_text(json.dumps(doc, indent=1) + '\\n')\n") == [1]
    assert _json_writes("f.write(json.dumps(doc).encode())\n") == [1]
    assert _json_writes("print(json.dumps(row))\nprint(name, json.dumps(row))\n") == []


def _calls(source: str, name: str) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
        for n in ast.walk(ast.parse(source))
    )


def test_every_benchmark_writes_json_through_the_writer():
    scripts = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "provenance.py")
    assert WRITERS <= {p.name for p in scripts}
    direct = {
        f"{p.relative_to(ROOT)}:{line}"
        for p in scripts
        for line in _json_writes(p.read_text(encoding="utf-8"))
    }
    assert not direct, f"JSON written around benchmarks/provenance.py's write_result: {sorted(direct)}"
    missing = {p.name for p in scripts if p.name in WRITERS and not _calls(p.read_text(), "write_result")}
    assert not missing, f"benchmarks that no longer call write_result: {sorted(missing)}"
