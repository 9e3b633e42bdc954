"""The C++ manifest fuzzer (cpp/fuzz/, built and run for a minute by `make fuzz`): its seed corpus.

Each committed seed replays through the fuzz target, which checks it against the tiny bundle folder it
writes at start-up (tiny ONNX models, a FIFO, a directory, symlinks in and out): the valid seeds load, each
hostile one ends in its one-line error, and none crashes, hangs on the FIFO or trips a sanitizer.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZER = ROOT / "build" / "cpp-fuzz" / "manifest_fuzz"
CORPUS = ROOT / "cpp" / "fuzz" / "corpus"
NOT_INSIDE = "is not a relative path inside the bundle: re-split the bundle with moedge split"

EXPECTED = {
    "valid_min.json": r"^ok$",
    "symlink_inside.json": r"^ok$",
    "expert_bytes_max.json": r"^ok$",
    "absolute_files_key.json": r"files\[\"/etc/passwd\"\] '/etc/passwd' " + NOT_INSIDE,
    "escape_files_key.json": r"files\[\"\.\./\.\./\.\./\.\./etc/passwd\"\] .* " + NOT_INSIDE,
    "escape_expert.json": r"layers\[0\]\.moe\.experts\[1\]\.file '\.\./outside/x\.onnx' " + NOT_INSIDE,
    "symlink_out.json": r"files\[\"out/x\.onnx\"\] 'out/x\.onnx' " + NOT_INSIDE,
    "symlink_dangling.json": r"files\[\"dangling\"\] 'dangling' " + NOT_INSIDE,
    "fifo_outside.json": r"files\[\"out/fifo\"\] 'out/fifo' " + NOT_INSIDE,
    "symlink_loop.json": r"bundle .* is missing loop: copy the whole bundle folder",
    "symlink_up.json": r"bundle file up/bundle/tokenizer\.json has 2 bytes, the manifest says 1: re-copy the bundle",
    "fifo_listed.json": r"bundle file fifo is not a regular file",
    "dir_as_stage.json": r"bundle file dir is not a regular file",
    "huge_bytes.json": r"files\[\"stages/head\.onnx\"\]\.bytes must be an integer in \[0, 4611686018427387904\], "
    r"got 9223372036854775807",
    "top_k_zero.json": r"layers\[0\]\.moe\.gating\.top_k must be an integer in \[1, 2\], got 0",
    "two_graphs_one_file.json": r"layers\[1\]\.stage 'stages/layer_000\.onnx' is used by two graphs",
    "not_listed.json": r"tokenizer 'vocab\.json' is not listed under files",
    "wrong_size.json": r"bundle file stages/head\.onnx has 2 bytes, the manifest says 5: re-copy the bundle",
    "wrong_hash.json": r"bundle file stages/head\.onnx does not match its sha256 in manifest\.json",
    "missing_file.json": r"bundle .* is missing stages/gone\.onnx: copy the whole bundle folder",
    "layer_index.json": r"layers\[1\]\.index must be layer index 1, got 0",
    "eos_out_of_vocab.json": r"model\.eos_token_id must be an integer in \[0, 3\], got 4",
    "not_json.json": r"manifest\.json is not valid JSON \(line 2, column 12\)$",
    "nested.json": r"the manifest must be an object, got \[\[\[",
    "tiny_mixtral.json": r"bundle file experts/layer_000_expert_000\.onnx has 2 bytes, the manifest says \d+",
    "external_data_unlisted.json": r"bundle graph stages/embedding\.onnx \(embedding\) reads external data "
    r"'embedding\.onnx\.data', which is not a file listed under files: re-split the bundle with moedge split",
}


def test_every_seed_has_an_expected_outcome():
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("seed", sorted(EXPECTED))
def test_seed_replays_to_its_outcome(seed):
    if not FUZZER.is_file():
        pytest.fail(f"{FUZZER} is not built: run `make fuzz` (make test does it first)")
    result = subprocess.run(
        [str(FUZZER), str(CORPUS / seed)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "MOEDGE_FUZZ_PRINT": "1", "ASAN_OPTIONS": "detect_leaks=1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = {
        line.removeprefix("moedge-fuzz: ")
        for line in result.stderr.splitlines()
        if line.startswith("moedge-fuzz: ")
    }
    assert len(outcomes) == 1, result.stderr[-3000:]  # libFuzzer may run an input twice (leak check)
    outcome = outcomes.pop()
    assert re.search(EXPECTED[seed], outcome.removeprefix("error: ")), outcome
