"""Tampered bundles: every runtime surface refuses them with one line and never reads outside the bundle.

Each case copies a tiny QDQ bundle (tiny-mixtral, rtn W8A8), breaks one thing (a path escaping through
every manifest field, symlinks, wrong types and ranges per key, truncated or swapped files, absurd
sizes), and runs it through ``moedge run``, ``moedge inspect``, ``moedge eval`` (in-process, through
``moedge.cli.main``) and ``moedge-run`` (release and ASan+UBSan builds). Each must exit 1 with one
line matching the case's message, and no sanitizer report.

Paths that escape point at a FIFO outside the bundle: opening it for reading would block, so while a
surface runs the test keeps trying a non-blocking open for writing, which succeeds only when someone
has the FIFO open for reading. That catches native opens (ONNX Runtime, the C++ runner) that an audit
hook cannot see, and unblocks the reader so the case fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from moedge.formats.manifest import sha256_file

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "robustness"
BUILDS = {"moedge-run": ROOT / "build" / "cpp", "moedge-run-asan": ROOT / "build" / "cpp-asan"}
SANITIZER = re.compile(r"AddressSanitizer|runtime error:|LeakSanitizer|UndefinedBehaviorSanitizer")
PY_SURFACES = ("run", "inspect", "eval")
CPP_SURFACES = tuple(BUILDS)

ESCAPE = r"is not a relative path inside the bundle"
UNLISTED = r"is not listed under files"
SIZE = r"has \d+ bytes, the manifest says \d+"
HASH = r"does not match its sha256"


@dataclass
class Case:
    """One tampering: what it does to a copy of the bundle, and the message every surface must give."""

    name: str
    tamper: Callable[[Path, Path], None]  # (bundle copy, outside folder)
    message: str
    surfaces: tuple[str, ...] = PY_SURFACES + CPP_SURFACES
    extra: dict[str, str] = field(default_factory=dict)  # surface -> message, where it differs
    seconds: float | None = None  # a hang case: each surface must answer within this (sanitizers: 4x)


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def _write(bundle: Path, doc: Any) -> None:
    (bundle / "manifest.json").write_text(json.dumps(doc, indent=1))


def edit(fn: Callable[[dict[str, Any], Path], None]) -> Callable[[Path, Path], None]:
    """A tampering that edits the manifest JSON in place."""

    def tamper(bundle: Path, outside: Path) -> None:
        doc = _manifest(bundle)
        fn(doc, outside)
        _write(bundle, doc)

    return tamper


def _outside(value: Any, outside: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{fifo}", str(outside / "fifo")).replace("{out}", str(outside))
    return value


def _setter_fn(path: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    def fn(doc: dict[str, Any], outside: Path) -> None:
        keys = path.split(".")
        node: Any = doc
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = _outside(value, outside)

    return fn


def setter(path: str, value: Any) -> Callable[[Path, Path], None]:
    """Set one manifest value by a dotted path (``layers.1.moe.gating.top_k``); ``{fifo}`` / ``{out}``
    in a string value become the FIFO / the outside folder."""
    return edit(_setter_fn(path, value))


def set_file(rel: str, value: Any, key: str | None = None) -> Callable[[Path, Path], None]:
    """Replace the ``files`` entry of ``rel`` (or one ``key`` of it) with ``value``."""

    def fn(doc: dict[str, Any], outside: Path) -> None:
        if key is None:
            doc["files"][rel] = value
        else:
            doc["files"][rel][key] = value

    return edit(fn)


def point(path: str, rel: str, *, list_it: bool = True) -> Callable[[Path, Path], None]:
    """Point a manifest path field at ``rel``; with ``list_it`` also list ``rel`` under files."""

    def fn(doc: dict[str, Any], outside: Path) -> None:
        target = _outside(rel, outside)
        _setter_fn(path, target)(doc, outside)
        if list_it:
            doc["files"][target] = {"sha256": "0" * 64, "bytes": 10}

    return edit(fn)


def add_file(rel: str) -> Callable[[Path, Path], None]:
    """List an extra ``files`` entry named ``rel``."""

    def fn(doc: dict[str, Any], outside: Path) -> None:
        target = _outside(rel, outside)
        doc["files"][target] = {"sha256": "0" * 64, "bytes": 10}

    return edit(fn)


def relist(bundle: Path, rels: list[str]) -> None:
    """Record the current size and sha256 of ``rels`` in the manifest (a tamperer who re-hashes)."""
    doc = _manifest(bundle)
    for rel in rels:
        doc["files"][rel] = {"sha256": sha256_file(bundle / rel), "bytes": (bundle / rel).stat().st_size}
    _write(bundle, doc)


def chain(*steps: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def tamper(bundle: Path, outside: Path) -> None:
        for step in steps:
            step(bundle, outside)

    return tamper


# --- file-level tamperings ---------------------------------------------------------------------------
EXPERT = "experts/layer_000_expert_000.onnx"
EXPERT_DATA = EXPERT + ".data"
STAGE = "stages/layer_000.onnx"
ROUTER = "stages/layer_001.router.npy"


def symlink_to_outside(rel: str, target: str = "fifo") -> Callable[[Path, Path], None]:
    def tamper(bundle: Path, outside: Path) -> None:
        path = bundle / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        path.symlink_to(outside / target)

    return tamper


def symlink_dir_to_outside(bundle: Path, outside: Path) -> None:
    shutil.copytree(bundle / "experts", outside / "experts")
    shutil.rmtree(bundle / "experts")
    (bundle / "experts").symlink_to(outside / "experts")


def truncate(rel: str) -> Callable[[Path, Path], None]:
    def tamper(bundle: Path, outside: Path) -> None:
        data = (bundle / rel).read_bytes()
        (bundle / rel).write_bytes(data[: len(data) // 2])

    return tamper


def flip_byte(rel: str) -> Callable[[Path, Path], None]:
    def tamper(bundle: Path, outside: Path) -> None:
        data = bytearray((bundle / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bundle / rel).write_bytes(bytes(data))

    return tamper


def swap(a: str, b: str) -> Callable[[Path, Path], None]:
    def tamper(bundle: Path, outside: Path) -> None:
        tmp = bundle / "swap.tmp"
        (bundle / a).rename(tmp)
        (bundle / b).rename(bundle / a)
        tmp.rename(bundle / b)

    return tamper


def remove(rel: str) -> Callable[[Path, Path], None]:
    return lambda bundle, outside: (bundle / rel).unlink()


def replace_with_dir(rel: str) -> Callable[[Path, Path], None]:
    def tamper(bundle: Path, outside: Path) -> None:
        (bundle / rel).unlink()
        (bundle / rel).mkdir()

    return tamper


def replace_with_fifo(rel: str) -> Callable[[Path, Path], None]:
    def tamper(bundle: Path, outside: Path) -> None:
        (bundle / rel).unlink()
        os.mkfifo(bundle / rel)

    return tamper


def external_data(location: str) -> Callable[[Path, Path], None]:
    """Rewrite the expert graph's external-data location (and re-hash it, as an attacker would)."""

    def tamper(bundle: Path, outside: Path) -> None:
        import onnx

        target = _outside(location, outside)
        model = onnx.load(str(bundle / EXPERT), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = target
        onnx.save(model, str(bundle / EXPERT))
        relist(bundle, [EXPERT])

    return tamper


def unlisted_copy(src: str, dst: str, path: str) -> Callable[[Path, Path], None]:
    """Copy a file to a new unlisted name inside the bundle and point a manifest field at it."""

    def tamper(bundle: Path, outside: Path) -> None:
        shutil.copy(bundle / src, bundle / dst)
        point(path, dst, list_it=False)(bundle, outside)

    return tamper


def many_layers(bundle: Path, outside: Path) -> None:
    doc = _manifest(bundle)
    layer = doc["layers"][0]
    doc["layers"] = [dict(copy.deepcopy(layer), index=i) for i in range(10_000)]
    doc["model"].pop("num_layers", None)
    _write(bundle, doc)


def not_json(bundle: Path, outside: Path) -> None:
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text[: len(text) // 2])


def drop(path: str) -> Callable[[Path, Path], None]:
    def fn(doc: dict[str, Any], outside: Path) -> None:
        keys = path.split(".")
        node: Any = doc
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[keys[-1]]

    return edit(fn)


def must(field_path: str) -> str:
    return re.escape(field_path) + r" (must be|is missing)"


def ort_cpu(rotary: str | None = None, *, list_it: bool = True) -> Callable[[Path, Path], None]:
    """Mark the bundle ``ort-cpu``; with ``rotary`` also point its rotary tables there (see ``point``)."""
    mark = setter("stage_target", "ort-cpu")
    return mark if rotary is None else chain(mark, point("rotary", rotary, list_it=list_it))


G = "layers.1.moe.gating"
E = "layers.1.moe.experts.2"
CASES = [
    # path escapes, every field: .., absolute, unnormalised, backslash, NUL
    Case("files-dotdot", add_file("../outside/fifo"), ESCAPE),
    Case("files-absolute", add_file("{fifo}"), ESCAPE),
    Case("files-inner-dotdot", add_file("stages/../../outside/fifo"), ESCAPE),
    Case("files-dot", add_file("./tokenizer.json"), ESCAPE),
    Case("files-empty-part", add_file("stages//layer_000.onnx"), ESCAPE),
    Case("files-backslash", add_file("stages\\layer_000.onnx"), ESCAPE),
    Case("files-nul", add_file("stages/layer_000.onnx\u0000x"), ESCAPE),
    Case("files-empty", add_file(""), ESCAPE),
    Case("embedding-dotdot", point("embedding.file", "../outside/fifo", list_it=False), ESCAPE),
    Case("embedding-absolute", point("embedding.file", "{fifo}"), ESCAPE),
    Case("head-dotdot", point("head.file", "..", list_it=False), ESCAPE),
    Case("head-absolute", point("head.file", "/etc/passwd"), ESCAPE),
    Case("stage-dotdot", point("layers.0.stage.file", "../outside/fifo", list_it=False), ESCAPE),
    Case("stage-absolute", point("layers.0.stage.file", "{fifo}"), ESCAPE),
    Case("expert-dotdot", point(E + ".file", "../outside/x.onnx", list_it=False), ESCAPE),
    Case("expert-absolute", point(E + ".file", "{out}/x.onnx"), ESCAPE),
    Case("expert-inner-dotdot", point(E + ".file", "experts/../../outside/fifo"), ESCAPE),
    Case("router-dotdot", point("layers.1.moe.router", "../outside/fifo", list_it=False), ESCAPE),
    Case("router-absolute", point("layers.1.moe.router", "{fifo}"), ESCAPE),
    Case("tokenizer-dotdot", point("tokenizer", "../outside/tokenizer.json", list_it=False), ESCAPE),
    Case("tokenizer-absolute", point("tokenizer", "{out}/tokenizer.json"), ESCAPE),
    Case("routing-dotdot", point("routing", "../outside/fifo", list_it=False), ESCAPE),
    Case("routing-absolute", point("routing", "{fifo}"), ESCAPE),
    # paths inside the bundle that are not listed (unverified)
    Case("tokenizer-unlisted", point("tokenizer", "tokenizer.json.bak", list_it=False), UNLISTED),
    Case(
        "tokenizer-unlisted-copy", unlisted_copy("tokenizer.json", "tokenizer2.json", "tokenizer"), UNLISTED
    ),
    Case("routing-unlisted", point("routing", "routing2.json", list_it=False), UNLISTED),
    Case("router-unlisted", unlisted_copy(ROUTER, "stages/r.npy", "layers.1.moe.router"), UNLISTED),
    Case("expert-unlisted", unlisted_copy(EXPERT, "experts/extra.onnx", E + ".file"), UNLISTED),
    Case("stage-unlisted", point("layers.1.stage.file", "stages/nope.onnx", list_it=False), UNLISTED),
    # symlinks out of the bundle
    Case("symlink-expert", symlink_to_outside(EXPERT), ESCAPE),
    Case("symlink-data", symlink_to_outside(EXPERT_DATA), ESCAPE),
    Case("symlink-tokenizer", symlink_to_outside("tokenizer.json"), ESCAPE),
    Case("symlink-experts-dir", symlink_dir_to_outside, ESCAPE),
    # external data of a graph (re-hashed by the tamperer)
    Case("external-data-dotdot", external_data("../../outside/fifo"), r"reads external data|External data"),
    Case("external-data-absolute", external_data("{fifo}"), r"reads external data|External data"),
    Case("external-data-unlisted", external_data("layer_000_expert_001.onnx.data.x"), r"reads external data"),
    # a graph file used twice, huge layer lists
    Case("stage-twice", setter("layers.1.stage.file", "stages/layer_000.onnx"), r"is used by two graphs"),
    Case("expert-twice", setter(E + ".file", "experts/layer_001_expert_000.onnx"), r"is used by two graphs"),
    Case("ten-thousand-layers", many_layers, r"is used by two graphs", seconds=5.0),
    # wrong types and ranges, per key
    Case("not-json", not_json, r"is not valid JSON"),
    Case("format", setter("format", "other"), r"is not a moedge bundle manifest"),
    Case("schema-99", setter("schema_version", 99), r"schema version"),
    Case("schema-string", setter("schema_version", "1"), r"schema.version"),
    Case("model-missing", drop("model"), must("model")),
    Case("model-list", setter("model", []), must("model")),
    Case("kv-heads-0", setter("model.num_kv_heads", 0), must("model.num_kv_heads")),
    Case("kv-heads-string", setter("model.num_kv_heads", "2"), must("model.num_kv_heads")),
    Case("head-dim-negative", setter("model.head_dim", -1), must("model.head_dim")),
    Case("head-dim-huge", setter("model.head_dim", 10**9), must("model.head_dim")),
    Case("vocab-0", setter("model.vocab_size", 0), must("model.vocab_size")),
    Case(
        "context-negative", setter("model.max_position_embeddings", -5), must("model.max_position_embeddings")
    ),
    Case("eos-outside-vocab", setter("model.eos_token_id", 10**6), must("model.eos_token_id")),
    Case("layers-empty", setter("layers", []), must("layers")),
    Case("layers-string", setter("layers", "x"), must("layers")),
    Case("layer-index", setter("layers.1.index", 5), must("layers[1].index")),
    Case("layer-index-float", setter("layers.1.index", 1.5), must("layers[1].index")),
    Case("num-experts-0", setter("layers.1.moe.num_experts", 0), must("layers[1].moe.num_experts")),
    Case(
        "num-experts-mismatch",
        setter("layers.1.moe.num_experts", 5),
        r"layers\[1\]\.moe\.(experts|num_experts)",
    ),
    Case("top-k-0", setter(G + ".top_k", 0), must("layers[1].moe.gating.top_k")),
    Case("top-k-negative", setter(G + ".top_k", -1), must("layers[1].moe.gating.top_k")),
    Case("top-k-above-experts", setter(G + ".top_k", 99), must("layers[1].moe.gating.top_k")),
    Case("top-k-string", setter(G + ".top_k", "2"), must("layers[1].moe.gating.top_k")),
    Case(
        "normalize-string",
        setter(G + ".normalize_top_k", "yes"),
        must("layers[1].moe.gating.normalize_top_k"),
    ),
    Case("scoring", setter(G + ".scoring", "sigmoid"), must("layers[1].moe.gating.scoring")),
    Case("gating-missing", drop(G), must("layers[1].moe.gating")),
    Case("experts-string", setter("layers.1.moe.experts", "x"), must("layers[1].moe.experts")),
    Case("graph-file-int", setter("layers.0.stage.file", 7), r"layers\[0\]\.stage\.file"),
    Case("graph-bytes-negative", setter("head.bytes", -1), must("head.bytes")),
    Case("graph-bytes-huge", setter(E + ".bytes", 2**63 + 1), must("layers[1].moe.experts[2].bytes")),
    Case("inputs-string", setter("embedding.inputs", "x"), must("embedding.inputs")),
    Case("input-name-int", setter("embedding.inputs.0.name", 5), must("embedding.inputs[0].name")),
    Case("files-string", setter("files", "x"), must("files")),
    Case("sha-garbage", set_file(STAGE, "xyz", "sha256"), r"sha256 must be"),
    Case("sha-missing", set_file(STAGE, {"bytes": 1}), r"sha256 (must be|is missing)"),
    Case("file-bytes-float", set_file(STAGE, 1e300, "bytes"), r"bytes must be"),
    Case("file-bytes-2^63", set_file(STAGE, 2**63, "bytes"), r"bytes must be"),
    Case("num-layers", setter("model.num_layers", 10_000), must("model.num_layers")),
    Case("precision-missing", drop("precision"), must("precision")),
    # truncated, swapped, missing and replaced files
    Case("truncated-expert", truncate(EXPERT), SIZE),
    Case("truncated-data", truncate(EXPERT_DATA), SIZE),
    Case("swapped-experts", swap(EXPERT_DATA, "experts/layer_001_expert_003.onnx.data"), f"{SIZE}|{HASH}"),
    Case("flipped-byte", flip_byte("stages/layer_001.onnx.data"), HASH),
    Case("flipped-tokenizer", flip_byte("tokenizer.json"), HASH),
    Case("missing-expert", remove(EXPERT), r"is missing experts/layer_000_expert_000\.onnx"),
    Case("stage-is-directory", replace_with_dir(STAGE), r"is not a regular file"),
    Case("expert-is-fifo", replace_with_fifo(EXPERT), r"is not a regular file"),
    Case("absurd-listed-size", set_file(STAGE, 2**62, "bytes"), SIZE),
    # the stage target: unknown targets, an ort-cpu bundle without its rotary tables or with them outside
    # the bundle
    Case("stage-target-gpu", setter("stage_target", "gpu"), must("stage_target")),
    Case("stage-target-int", setter("stage_target", 1), must("stage_target")),
    Case("ort-cpu-without-rotary", ort_cpu(), must("rotary")),
    Case("rotary-dotdot", ort_cpu("../outside/fifo", list_it=False), ESCAPE),
    Case("rotary-absolute", ort_cpu("{fifo}"), ESCAPE),  # listed too: moedge-run refuses the files key
    Case("rotary-unlisted", ort_cpu("rotary_cache.npy", list_it=False), UNLISTED),
    Case("rotary-dotdot-tensorrt", point("rotary", "../outside/fifo", list_it=False), ESCAPE),
    # fields only the Python runtime reads (moedge-run ignores them)
    Case("num-heads-0", setter("model.num_heads", 0), must("model.num_heads"), PY_SURFACES),
    Case("rope-theta-string", setter("model.rope_theta", "1e4"), must("model.rope_theta"), PY_SURFACES),
    Case("rope-theta-negative", setter("model.rope_theta", -1.0), must("model.rope_theta"), PY_SURFACES),
]


@pytest.fixture(scope="module")
def summary():
    rows: list[dict[str, Any]] = []
    yield rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        c = counts.setdefault(row["surface"], {"cases": 0, "passed": 0})
        c["cases"] += 1
        c["passed"] += int(row["ok"])
    doc = {
        "generated_by": "pytest tests/integration/test_bundle_tampering.py",
        "what": "tampered tiny-mixtral QDQ bundles through every runtime surface: exit 1, one matching line, "
        "nothing outside the bundle opened, no sanitizer report",
        "cases": len(CASES),
        "counts": counts,
        "rows": rows,
    }
    (RESULTS / "bundle_tampering.json").write_text(json.dumps(doc, indent=1) + "\n")


@pytest.fixture
def tampered(qdq_bundle, tmp_path):
    def make(case: Case) -> tuple[Path, Path]:
        outside = tmp_path / "outside"
        outside.mkdir()
        os.mkfifo(outside / "fifo")
        shutil.copy(qdq_bundle / EXPERT, outside / "x.onnx")
        shutil.copy(qdq_bundle / "tokenizer.json", outside / "tokenizer.json")
        bundle = tmp_path / "bundle"
        shutil.copytree(qdq_bundle, bundle)
        case.tamper(bundle, outside)
        return bundle, outside

    return make


class FifoWatch:
    """Notices (and unblocks) anyone who opens ``fifo`` for reading while a surface runs."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.opened = False

    def poll(self) -> None:
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.ENOENT):
                raise
            return
        self.opened = True
        os.close(fd)  # the reader sees end of file and goes on


def _in_process(argv: list[str], watch: FifoWatch, timeout: float = 120.0) -> tuple[int, str]:
    from moedge.cli import main

    err = io.StringIO()
    result: dict[str, int] = {}

    def target() -> None:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            result["code"] = main(argv)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        watch.poll()
        thread.join(0.02)
    assert not thread.is_alive(), f"{argv} did not finish in {timeout} s"
    return result.get("code", -1), err.getvalue()


def _subprocess(argv: list[str], watch: FifoWatch, timeout: float = 60.0) -> tuple[int, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "ASAN_OPTIONS": "detect_leaks=1"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        watch.poll()
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        pytest.fail(f"{argv} did not finish in {timeout} s")
    _, err = proc.communicate()
    return proc.returncode, err


def _argv(surface: str, bundle: Path) -> list[str]:
    if surface == "run":
        return [
            "-q",
            "run",
            str(bundle),
            "--ids",
            "1,2,3",
            "-n",
            "2",
            "--backend",
            "ort-cpu",
            "--threads",
            "1",
        ]
    if surface == "inspect":
        return ["-q", "inspect", str(bundle), "--no-ort"]
    if surface == "eval":
        return ["-q", "eval", str(bundle), "--data", "demo", "--max-windows", "1", "--seqlen", "16"]
    binary = BUILDS[surface] / "moedge-run"
    if not binary.is_file():
        pytest.fail(f"{binary} is not built: run `make cpp` (make test does it first)")
    return [str(binary), str(bundle), "--ids", "1,2,3", "-n", "2", "--threads", "1"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tampered_bundle_is_refused_everywhere(case, tampered, summary):
    bundle, outside = tampered(case)
    failures = []
    for surface in case.surfaces:
        watch = FifoWatch(outside / "fifo")
        argv = _argv(surface, bundle)
        start = time.monotonic()
        code, err = _subprocess(argv, watch) if surface in BUILDS else _in_process(argv, watch)
        elapsed = time.monotonic() - start
        lines = [line for line in err.splitlines() if line.strip()]
        pattern = case.extra.get(surface, case.message)
        problems = []
        if code != 1:
            problems.append(f"exit {code}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines")
        if not re.search(pattern, err):
            problems.append(f"no /{pattern}/")
        if "Traceback" in err or SANITIZER.search(err):
            problems.append("traceback or sanitizer report")
        if watch.opened:
            problems.append("opened the FIFO outside the bundle")
        limit = None if case.seconds is None else case.seconds * (4 if surface.endswith("asan") else 1)
        if limit is not None and elapsed > limit:
            problems.append(f"took {elapsed:.1f} s (limit {limit} s)")
        summary.append(
            {
                "case": case.name,
                "surface": surface,
                "exit_code": code,
                "seconds": round(elapsed, 3),
                "line": str(lines[0]).replace(str(bundle.parent), "<tmp>") if lines else "",
                "ok": not problems,
            }
        )
        if problems:
            failures.append(f"{surface}: {', '.join(problems)}: {err.strip()[:400]}")
    assert not failures, "\n".join(failures)


def test_the_table_is_large_enough():
    assert len(CASES) >= 60
