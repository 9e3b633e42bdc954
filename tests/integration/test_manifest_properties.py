"""Random manifest mutations (hypothesis): every runtime answers with one clean line, never a traceback.

Two strategies over the manifest of a tiny QDQ bundle (only manifest.json changes; the files stay):
``breaking`` replaces a value the runtimes read with a value of another JSON type, deletes a required
key, or points a path field out of the bundle (each always invalid: exit 1 or 2); ``anything``
replaces any value anywhere with any JSON value (exit 0 is allowed there, when the change is harmless).
Every example runs through ``moedge run`` in-process, and the same corpus then through ``moedge-run``
(release and ASan+UBSan builds).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "robustness"
BUILDS = {"moedge-run": ROOT / "build" / "cpp", "moedge-run-asan": ROOT / "build" / "cpp-asan"}
EXCEPTION_REPR = re.compile(r"Traceback|\b[A-Z]\w*(Error|Exception)\b[:(]|std::|json\.exception|what\(\)")
SANITIZER = re.compile(r"AddressSanitizer|runtime error:|LeakSanitizer")

# Keys both runtimes read and type strictly (optional keys that may be null are not replaced by null).
STRICT = {
    "format", "schema_version", "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings",
    "index", "file", "bytes", "sha256", "num_experts", "top_k", "normalize_top_k", "scoring", "dtype",
    "inputs", "outputs", "experts", "gating", "stage", "embedding", "head", "layers", "files", "model",
    "precision", "router", "tokenizer",
}  # fmt: skip
REQUIRED = {"format", "model", "embedding", "head", "layers", "files", "precision", "stage", "file", "bytes",
            "sha256", "num_experts", "top_k", "gating", "experts", "num_kv_heads", "head_dim", "index"}  # fmt: skip

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["../x", "/etc/passwd", "", "a/../../b", "stages/layer_000.onnx", "0" * 64]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number" if not isinstance(value, int) else "int"
    return type(value).__name__


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in items:
        path = (*prefix, key)
        out.append(path)
        out += _paths(value, path)
    return out


def _strict(path: tuple[Any, ...]) -> bool:
    last = path[-1]
    if "shape" in path or not isinstance(last, str) or last not in STRICT:
        return False
    if last == "name" or (path[0] == "model" and last not in ("num_kv_heads", "head_dim", "vocab_size")):
        return False
    return not (path[0] == "quantization" or path[0] == "extra")


def _set(doc: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> None:
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value


class Corpus(tuple):
    """(working bundle copy, its original manifest, every mutated manifest with what it must do)."""

    def __repr__(self) -> str:
        return f"Corpus({self[0]}, {len(self[2])} cases)"


@pytest.fixture(scope="module")
def corpus(qdq_bundle, tmp_path_factory):
    """The working bundle copy, its original manifest, and every mutated manifest with what it must do."""
    bundle = tmp_path_factory.mktemp("props") / "bundle"
    shutil.copytree(qdq_bundle, bundle)
    original = json.loads((bundle / "manifest.json").read_text())
    cases: list[dict[str, Any]] = []
    yield Corpus((bundle, original, cases))
    (bundle / "manifest.json").write_text(json.dumps(original))


def _run_python(bundle: Path) -> tuple[int, str]:
    from moedge.cli import main

    err = io.StringIO()
    argv = ["-q", "run", str(bundle), "--ids", "1,2", "-n", "1", "--backend", "ort-cpu", "--threads", "1"]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _check(code: int, err: str, *, must_fail: bool) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    problems = []
    if code not in ((1, 2) if must_fail else (0, 1, 2)):
        problems.append(f"exit {code}")
    if code != 0 and len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    if EXCEPTION_REPR.search(err) or SANITIZER.search(err):
        problems.append("exception repr, traceback or sanitizer report")
    return problems


def _example(corpus: Any, path: tuple[Any, ...], doc: dict[str, Any], must_fail: bool, label: str) -> None:
    bundle, _, cases = corpus
    text = json.dumps(doc)
    (bundle / "manifest.json").write_text(text)
    code, err = _run_python(bundle)
    problems = _check(code, err, must_fail=must_fail)
    cases.append(
        {"strategy": label, "path": list(map(str, path)), "manifest": text, "must_fail": must_fail}
        | {
            "python": {
                "exit_code": code,
                "line": err.strip()[:300].replace(str(bundle.parent), "<tmp>"),
                "ok": not problems,
            }
        }
    )
    assert not problems, f"{label} at {path}: {problems}: {err.strip()[:400]}"


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_breaking_mutations_exit_1_or_2_with_one_line(corpus, data):
    _, original, _ = corpus
    doc = json.loads(json.dumps(original))
    path = data.draw(st.sampled_from([p for p in _paths(doc) if _strict(p)]))
    node = doc
    for key in path:
        node = node[key]
    how = data.draw(st.sampled_from(["retype", "delete", "escape"]))
    if how == "delete" and path[-1] in REQUIRED:
        _set(doc, path, None, delete=True)
    elif how == "escape" and isinstance(node, str) and path[-1] in ("file", "router", "tokenizer"):
        _set(doc, path, data.draw(st.sampled_from(["../x", "/etc/passwd", "a/../../b", "./x", "x//y", ""])))
    else:
        value = data.draw(json_values.filter(lambda v: _kind(v) != _kind(node) and v is not None))
        _set(doc, path, value)
    _example(corpus, path, doc, True, f"breaking-{how}")


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_any_mutation_never_gives_a_traceback(corpus, data):
    _, original, _ = corpus
    doc = json.loads(json.dumps(original))
    path = data.draw(st.sampled_from(_paths(doc)))
    _set(doc, path, data.draw(json_values))
    _example(corpus, path, doc, False, "anything")


@pytest.mark.parametrize("tool", list(BUILDS))
def test_the_same_corpus_through_moedge_run(corpus, tool):
    bundle, _, cases = corpus
    assert len(cases) >= 100, "run after the property tests (same module, file order)"
    binary = BUILDS[tool] / "moedge-run"
    if not binary.is_file():
        pytest.fail(f"{binary} is not built: run `make cpp` (make test does it first)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "ASAN_OPTIONS": "detect_leaks=1"}
    failures = []
    for case in cases:
        (bundle / "manifest.json").write_text(case["manifest"])
        proc = subprocess.run(
            [str(binary), str(bundle), "--ids", "1,2", "-n", "1", "--threads", "1"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        problems = _check(proc.returncode, proc.stderr, must_fail=case["must_fail"])
        line = proc.stderr.strip()[:300].replace(str(bundle.parent), "<tmp>")
        case[tool] = {"exit_code": proc.returncode, "line": line, "ok": not problems}
        if problems:
            failures.append(f"{case['strategy']} at {case['path']}: {problems}: {proc.stderr.strip()[:300]}")
    _write_summary(cases)
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:20])


def _write_summary(cases: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for case in cases:
        for surface in ("python", *BUILDS):
            if surface in case:
                c = counts.setdefault(surface, {"cases": 0, "passed": 0, "exit_0": 0})
                c["cases"] += 1
                c["passed"] += int(case[surface]["ok"])
                c["exit_0"] += int(case[surface]["exit_code"] == 0)
    doc = {
        "generated_by": "pytest tests/integration/test_manifest_properties.py",
        "what": "hypothesis mutations of a tiny QDQ bundle's manifest through moedge run and moedge-run",
        "counts": counts,
        "rows": [{k: v for k, v in case.items() if k != "manifest"} for case in cases],
    }
    (RESULTS / "manifest_properties.json").write_text(json.dumps(doc, indent=1) + "\n")
