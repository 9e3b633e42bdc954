"""Bad CLI inputs: every one is a single clear stderr line, a non-zero exit, no traceback, nothing written.

Flags are checked at parse time (exit 2); files, headers and recipes when read (exit 1). The cases are
recorded in benchmarks/results/robustness/cli_inputs.json at the end of the module.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moedge.cli import main

REPO = Path(__file__).resolve().parents[2]
SUMMARY = REPO / "benchmarks" / "results" / "robustness" / "cli_inputs.json"


@pytest.fixture(scope="module")
def summary():
    """Rows {surface, case, exit_code, line}, written as JSON when the module ends."""
    rows: list[dict[str, object]] = []
    yield rows
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "generated_by": "pytest tests/integration/test_cli_inputs.py",
        "cases": rows,
        "counts": dict(Counter(str(r["surface"]) for r in rows)),
    }
    SUMMARY.write_text(json.dumps(doc, indent=1) + "\n")


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _check(summary, surface: str, case: str, code: int, err: str, *, want: int, text: str) -> str:
    """One stderr line holding ``text``, exit ``want``, no traceback; the case goes into the summary."""
    lines = _lines(err)
    summary.append({"surface": surface, "case": case, "exit_code": code, "line": lines[-1] if lines else ""})
    assert code == want, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert text in lines[0], lines[0]
    return lines[0]


def _subprocess(*argv: str, stdin: str | None = None, timeout: float = 5) -> tuple[int, str, str, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "moedge", *argv],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.returncode, result.stdout, result.stderr, time.perf_counter() - start


# --- numeric flags: argparse types, exit 2 ----------------------------------------------------------------

BAD_FLAGS = [
    (["run", "B", "-p", "x", "--gpu-budget=-5%"], "--gpu-budget"),
    (["run", "B", "-p", "x", "--gpu-budget", "150%"], "--gpu-budget"),
    (["run", "B", "-p", "x", "--gpu-budget", "12XB"], "--gpu-budget"),
    (["run", "B", "-p", "x", "--gpu-budget", "-1GiB"], "--gpu-budget"),
    (["run", "B", "-p", "x", "-n", "0"], "--max-new-tokens"),
    (["run", "B", "-p", "x", "--temperature", "-1"], "--temperature"),
    (["run", "B", "-p", "x", "--temperature", "nan"], "--temperature"),
    (["run", "B", "-p", "x", "--temperature", "inf"], "--temperature"),
    (["run", "B", "-p", "x", "--top-p", "0"], "--top-p"),
    (["run", "B", "-p", "x", "--top-p", "1.5"], "--top-p"),
    (["run", "B", "-p", "x", "--top-k", "-1"], "--top-k"),
    (["run", "B", "-p", "x", "--threads", "0"], "--threads"),
    (["run", "B", "-p", "x", "--threads", "100000"], "--threads"),
    (["run", "B", "-p", "x", "--seed", "-1"], "--seed"),
    (["run", "B", "-p", "x", "--stop", "-3"], "--stop"),
    (["export", "tiny-llama", "-o", "O", "--opset", "99"], "--opset"),
    (["export", "tiny-llama", "-o", "O", "--opset", "17"], "--opset"),
    (["eval", "tiny-llama", "--seqlen", "1"], "--seqlen"),
    (["eval", "tiny-llama", "--max-windows", "0"], "--max-windows"),
    (["eval", "tiny-llama", "--threads", "100000"], "--threads"),
    (["calibrate", "tiny-llama", "-o", "O", "--seqlen", "0"], "--seqlen"),
    (["calibrate", "tiny-llama", "-o", "O", "--calib-windows", "0"], "--calib-windows"),
    (["calibrate", "tiny-llama", "-o", "O", "--calib-windows", "1000000"], "--calib-windows"),
    (["calibrate", "tiny-llama", "-o", "O", "--batch-size", "0"], "--batch-size"),
    (["calibrate", "tiny-llama", "-o", "O", "--seed", str(2**64)], "--seed"),
    (["calibrate", "tiny-llama", "-o", "O", "--percentile", "0"], "--percentile"),
    (["calibrate", "tiny-llama", "-o", "O", "--percentile", "100.5"], "--percentile"),
    (["calibrate", "tiny-llama", "-o", "O", "--alpha", "1.5"], "--alpha"),
    (["calibrate", "tiny-llama", "-o", "O", "--auto-keep-fp", "1"], "--auto-keep-fp"),
    (["calibrate", "tiny-llama", "-o", "O", "--seed", "-1"], "--seed"),
    (["calibrate", "tiny-llama", "-o", "O", "--threads", "0"], "--threads"),
    (["demo", "--windows", "0"], "--windows"),
    (["demo", "--new-tokens", "0"], "--new-tokens"),
    (["demo", "--seqlen", "x"], "--seqlen"),
    (["profile", "B", "-o", "r.json", "--tokens", "0"], "--tokens"),
    (["profile", "B", "-o", "r.json", "--gpu-budget", "101%"], "--gpu-budget"),
    (["profile", "B", "-o", "r.json", "--threads", "100000"], "--threads"),
    (["build", "B", "--max-tokens", "0"], "--max-tokens"),
    (["build", "B", "--context", "0"], "--context"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_bad_flag_value_is_one_usage_line(argv, flag, summary, capsys):
    start = time.perf_counter()
    code, out, err = _run(capsys, *argv)
    line = _check(summary, "flags", " ".join(argv), code, err, want=2, text=flag)
    assert line.startswith("moedge: error: argument ") and out == ""
    assert time.perf_counter() - start < 5  # --threads 100000 is refused, never tried


# The runtime bench left the device CLI (`moedge bench runtime`): it is benchmarks/runtime_bench.py.
BAD_BENCH_FLAGS = [
    (["--budgets", "0,2"], "--budgets"),
    (["--threads", "0"], "--threads"),
    (["--repeats", "0"], "--repeats"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--stats-tokens", "1"], "--stats-tokens"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD_BENCH_FLAGS, ids=[" ".join(a) for a, _ in BAD_BENCH_FLAGS])
def test_bad_bench_flag_value_is_one_usage_line(argv, flag, summary):
    bench = REPO / "benchmarks" / "runtime_bench.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--bundle", "B", *argv], capture_output=True, text=True, timeout=60
    )
    case = " ".join(["benchmarks/runtime_bench.py", "--bundle", "B", *argv])
    line = _check(summary, "flags", case, result.returncode, result.stderr, want=2, text=flag)
    assert line.startswith("runtime_bench.py: error: argument ") and result.stdout == ""


def test_missing_arguments_are_one_usage_line(summary, capsys):
    code, _, err = _run(capsys, "export")
    _check(summary, "flags", "export (no arguments)", code, err, want=2, text="usage: moedge export --help")


# --- input files: regular files only, at most 64 MiB ------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles("mixtral")  # MoE layers 0 and 1, experts 0-3 each


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("where", ["/dev/zero", "fifo"])
@pytest.mark.parametrize("flag", ["--prompt-file", "--plan", "--routing", "--profile"])
def test_device_or_fifo_input_ends_at_once(flag, where, bundle, fifo, summary):
    path = "/dev/zero" if where == "/dev/zero" else str(fifo)
    argv = ["run", str(bundle), *(["-p", "x"] if flag != "--prompt-file" else []), flag, path]
    code, _, err, seconds = _subprocess(*argv)
    _check(summary, "files", f"run {flag} {where}", code, err, want=1, text="not a regular file")
    assert seconds < 5


def test_text_data_from_a_fifo_or_a_huge_file(tmp_path, fifo, summary, capsys):
    code, _, err = _run(capsys, "eval", "tiny-llama", "--data", str(fifo))
    _check(summary, "files", "eval --data FIFO", code, err, want=1, text="not a regular file")
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as f:
        f.truncate(65 * 2**20)  # sparse: no disk used
    code, _, err = _run(
        capsys, "calibrate", "tiny-llama", "-o", str(tmp_path / "r"), "--calib-data", str(huge)
    )
    _check(summary, "files", "calibrate --calib-data 65 MiB", code, err, want=1, text="more than the 64 MiB")
    assert not (tmp_path / "r").exists()


def _plan(path: Path, experts: object, **extra: object) -> Path:
    path.write_text(json.dumps({"format": "moedge-placement", "version": 1, "experts": experts, **extra}))
    return path


def _routing(path: Path, layers: list[int], experts: int) -> Path:
    doc = {
        "format_version": 1,
        "num_experts": experts,
        "top_k": 2,
        "tokens": 0,
        "layers": layers,
        "expert_token_counts": {str(layer): [0] * experts for layer in layers},
    }
    path.write_text(json.dumps(doc))
    return path


def test_plans_and_routing_must_name_experts_of_the_bundle(bundle, tmp_path, summary, capsys):
    cases = [
        ("--plan", _plan(tmp_path / "p1.json", [[0, 1], [0, 4]]), "entry 1 names expert [0, 4]"),
        ("--plan", _plan(tmp_path / "p2.json", [[7, 0]]), "layer 7 is not an MoE layer"),
        ("--plan", _plan(tmp_path / "p3.json", [[0, 1], [0, 1]]), "a second time"),
        ("--plan", _plan(tmp_path / "p4.json", "all"), "field experts"),
        ("--plan", _plan(tmp_path / "p5.json", [[0, "1"]]), "experts entry 0"),
        ("--plan", _plan(tmp_path / "p6.json", [], settings={"topup": 3}), "setting topup"),
        ("--routing", _routing(tmp_path / "r1.json", [0, 9], 4), "layer 9 is not an MoE layer"),
        ("--routing", _routing(tmp_path / "r2.json", [0, 1], 8), "num_experts is 8"),
        ("--routing", _plan(tmp_path / "r3.json", [], format_version=1), "field num_experts is missing"),
    ]
    for flag, path, text in cases:
        code, _, err = _run(capsys, "run", str(bundle), "-p", "x", "--backend", "simulated", flag, str(path))
        line = _check(summary, "files", f"run {flag} {path.name}", code, err, want=1, text=text)
        assert path.name in line and "KeyError" not in line
    merge = tmp_path / "r1.json"
    code, _, err = _run(
        capsys, "profile", str(bundle), "-o", str(tmp_path / "out.json"), "--merge", str(merge)
    )
    _check(summary, "files", "profile --merge r1.json", code, err, want=1, text="layer 9 is not an MoE layer")
    assert not (tmp_path / "out.json").exists()


def test_hardware_profile_file_fields_are_checked(bundle, tmp_path, summary, capsys):
    from moedge.runtime.profiles import BUILTIN

    raw = {k: v for k, v in BUILTIN["rtx4090-pcie4"].to_dict().items() if k in ("description",)}
    raw |= {"unified_memory": False, "device_memory_bytes": 2**34, "gpu_mem_bandwidth_gbps": -1}
    path = tmp_path / "board.json"
    path.write_text(json.dumps(raw))
    code, _, err = _run(
        capsys, "run", str(bundle), "-p", "x", "--backend", "simulated", "--profile", str(path)
    )
    _check(
        summary, "files", "run --profile negative bandwidth", code, err, want=1, text="gpu_mem_bandwidth_gbps"
    )


# --- model headers: bounded before any allocation ----------------------------------------------------------


def test_gguf_with_a_million_blocks_ends_at_once(tmp_path, summary, capsys):
    from gguf import GGUFWriter

    path = tmp_path / "huge.gguf"
    logging.disable(logging.INFO)  # the writer's own notes are not the CLI's output
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1_000_000)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_context_length(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(16)])
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logging.disable(logging.NOTSET)
    start = time.perf_counter()
    code, _, err = _run(capsys, "eval", str(path), "--data", "demo")
    _check(summary, "headers", "gguf block_count 1e6", code, err, want=1, text="llama.block_count is 1000000")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("header", "text"),
    [
        ((2**30, 64, 2, 4, 4, 32, 64), "header field dim is 1073741824"),
        ((64, 96, 1_000_000, 4, 4, 32, 64), "header field n_layers is 1000000"),
        ((64, 96, 2, 4, 4, -(2**30), 64), "header field vocab_size"),
        ((4096, 11008, 1000, 32, 32, 32000, 2048), "the header implies"),  # in bounds, file too short
    ],
    ids=["dim", "layers", "vocab", "size"],
)
def test_llama2c_header_is_bounded(header, text, tmp_path, summary, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<7i", *header) + b"\0" * 4096)
    start = time.perf_counter()
    code, _, err = _run(capsys, "eval", str(path), "--data", "demo")
    _check(summary, "headers", f"llama2.c {text.split(' is')[0]}", code, err, want=1, text=text)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"num_hidden_layers": 1_000_000}, "num_hidden_layers is 1000000"),
        ({"hidden_size": 2**20}, "hidden_size is 1048576"),
        ({"vocab_size": 2**23}, "vocab_size is 8388608"),
        ({"num_local_experts": 10**6}, "num_local_experts is 1000000"),
        ({"num_hidden_layers": 1000, "hidden_size": 4096}, "the weight files hold only"),
    ],
    ids=["layers", "hidden", "vocab", "experts", "size"],
)
def test_hf_config_is_bounded(fields, text, tmp_path, summary, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96}
    config |= {"vocab_size": 258, "num_attention_heads": 4, "num_local_experts": 4, **fields}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    code, _, err = _run(capsys, "export", str(folder), "-o", str(tmp_path / "out"))
    _check(summary, "headers", f"config.json {next(iter(fields))}", code, err, want=1, text=text)
    assert not (tmp_path / "out").exists()


# --- no code from model folders, no prompt on stdin --------------------------------------------------------


def test_auto_map_code_never_runs_and_nothing_asks(tmp_path, monkeypatch, summary, capsys):
    import io

    from moedge.testbeds import build_tiny

    folder, marker = tmp_path / "remote", tmp_path / "MARKER"
    loaded = build_tiny("llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    asked: list[object] = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    out_dir = tmp_path / "out"
    capsys.readouterr()
    code, out, err = _run(capsys, "-q", "export", str(folder), "-o", str(out_dir), "--no-cache")
    warnings = [line for line in _lines(err) if "auto_map" in line]
    summary.append(
        {"surface": "remote-code", "case": "export auto_map", "exit_code": code, "line": warnings[0]}
    )
    assert code == 0, err
    assert not marker.exists() and not asked
    assert sys.stdin.read() == "y\n"  # nothing consumed the answer
    assert len(warnings) == 1 and "ignored" in warnings[0]
    assert not any(q in out + err for q in ("[y/N]", "Do you wish", "trust_remote_code"))
    assert (out_dir / "model.onnx").is_file()


# --- recipes -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from moedge.calibration import CalibrationConfig, calibrate, save_recipe
    from moedge.testbeds import build_tiny

    loaded = build_tiny("mixtral")
    samples = list(np.random.default_rng(0).integers(0, 256, (4, 32)))
    result = calibrate(loaded, samples, CalibrationConfig(method="rtn"), progress=False)
    return save_recipe(loaded, result, tmp_path_factory.mktemp("recipe") / "r")


LINEAR = "model.layers.0.mlp.experts.0.down_proj"


def _edit_meta(folder: Path, value: object) -> None:
    meta = json.loads((folder / "recipe.json").read_text())
    meta["linears"][LINEAR]["input_scale"] = value
    (folder / "recipe.json").write_text(json.dumps(meta))


def _edit_tensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "weights.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "weights.safetensors"))


def _set_scale(value: float):
    def edit(tensors):
        tensors[f"{LINEAR}.weight_scale"][3] = value

    return edit


def _shrink_scale(tensors) -> None:
    tensors[f"{LINEAR}.weight_scale"] = tensors[f"{LINEAR}.weight_scale"][:10].clone()


def _reshape_linear(tensors) -> None:
    import torch

    tensors[f"{LINEAR}.qweight"] = torch.zeros((64, 48), dtype=torch.int8)


def _truncate(folder: Path) -> None:
    path = folder / "weights.safetensors"
    os.truncate(path, path.stat().st_size - 100)


RECIPE_CASES = [
    ("input_scale NaN", lambda f: _edit_meta(f, float("nan")), "input_scale must be a finite number > 0"),
    ("input_scale 0", lambda f: _edit_meta(f, 0), "input_scale must be a finite number > 0"),
    ("input_scale negative", lambda f: _edit_meta(f, -0.5), "input_scale must be a finite number > 0"),
    ("input_scale string", lambda f: _edit_meta(f, "big"), "input_scale must be a finite number > 0"),
    ("weight_scale NaN", lambda f: _edit_tensors(f, _set_scale(float("nan"))), "row 3 is nan"),
    ("weight_scale 0", lambda f: _edit_tensors(f, _set_scale(0.0)), "row 3 is 0.0"),
    ("weight_scale negative", lambda f: _edit_tensors(f, _set_scale(-1.0)), "row 3 is -1.0"),
    ("weight_scale inf", lambda f: _edit_tensors(f, _set_scale(float("inf"))), "row 3 is inf"),
    ("weight_scale shape", lambda f: _edit_tensors(f, _shrink_scale), "needs shape [64]"),
    ("qweight shape", lambda f: _edit_tensors(f, _reshape_linear), "has weight shape [64, 96]"),
    ("weights truncated", _truncate, "truncated or corrupt"),
]


@pytest.mark.parametrize(("case", "damage", "text"), RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_damaged_recipe_is_one_line(case, damage, text, recipe, tmp_path, summary, capsys):
    folder = tmp_path / "recipe"
    shutil.copytree(recipe, folder)
    damage(folder)
    out_dir = tmp_path / "out"
    code, _, err = _run(capsys, "-q", "export", "tiny-mixtral", "--recipe", str(folder), "-o", str(out_dir))
    line = _check(summary, "recipe", case, code, err, want=1, text=text)
    assert "SafetensorError" not in line and "KeyError" not in line
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing half-written


# --- the model's context, flags that do nothing, Ctrl-C ----------------------------------------------------


def test_seqlen_beyond_the_context_is_refused(tmp_path, summary, capsys):
    code, _, err = _run(
        capsys,
        "calibrate",
        "tiny-llama",
        "-o",
        str(tmp_path / "r"),
        "--seqlen",
        "1024",
        "--calib-data",
        "demo",
    )
    _check(
        summary, "context", "calibrate --seqlen 1024", code, err, want=1, text="context of tiny-llama (512"
    )
    assert not (tmp_path / "r").exists()
    code, _, err = _run(capsys, "eval", "tiny-llama", "--data", "demo", "--seqlen", "1024")
    _check(summary, "context", "eval --seqlen 1024", code, err, want=1, text="give --seqlen 512 or less")
    argv = [
        "calibrate",
        "tiny-llama",
        "-o",
        str(tmp_path / "r"),
        "--calib-windows",
        "65536",
        "--seqlen",
        "2048",
    ]
    code, _, err = _run(capsys, *argv)
    _check(summary, "context", "calibrate 65536 x 2048 tokens", code, err, want=1, text="calibration holds")


def test_flags_without_effect_warn_once(bundle, summary, capsys):
    argv = ["-q", "run", str(bundle), "--ids", "1,2", "-n", "1", "--backend", "ort-cpu", "--no-stream"]
    code, _, err = _run(capsys, *argv, "--policy", "lru", "--gpu-budget", "10%")
    summary.append(
        {"surface": "no-effect", "case": "ort-cpu --policy --gpu-budget", "exit_code": code, "line": err}
    )
    assert code == 0, err
    assert _lines(err) == [
        "moedge: warning: --policy, --gpu-budget have no effect with --backend ort-cpu: every expert runs "
        "on the CPU; --backend simulated models a GPU"
    ]
    code, _, err = _run(capsys, *argv, "--top-k", "5")
    summary.append({"surface": "no-effect", "case": "greedy --top-k", "exit_code": code, "line": err.strip()})
    assert code == 0 and len(_lines(err)) == 1 and "--top-k has no effect with --temperature 0" in err
    code, _, err = _run(capsys, *argv)
    assert code == 0 and err == ""


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("moment", ["parser construction", "argument parsing", "command"])
def test_ctrl_c_at_any_moment_exits_130_quietly(moment, monkeypatch, summary, capsys):
    import moedge.cli as cli
    import moedge.cli.eval as cli_eval

    target = {
        "parser construction": (cli, "build_parser"),
        "argument parsing": (cli_eval, "SEQLEN"),
        "command": (cli_eval, "execute"),
    }
    monkeypatch.setattr(*target[moment], _interrupt)
    code, _, err = _run(capsys, "eval", "tiny-llama", "--seqlen", "64")
    summary.append({"surface": "interrupt", "case": moment, "exit_code": code, "line": err.strip()})
    assert code == 130 and err == "moedge: interrupted\n"


def test_real_sigint_in_a_process_exits_130_quietly(summary):
    body = (
        "import os, signal, sys\n"
        "import moedge.cli as cli\n"
        "build = cli.build_parser\n"
        "def parser():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return build()\n"
        "cli.build_parser = parser\n"
        "sys.exit(cli.main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", body, "eval", "tiny-llama"], capture_output=True, text=True, timeout=60
    )
    summary.append(
        {"surface": "interrupt", "case": "SIGINT", "exit_code": result.returncode, "line": result.stderr}
    )
    assert result.returncode == 130 and result.stderr == "moedge: interrupted\n"
