"""The CLI: happy paths on tiny models, and one clear line with exit code 1 for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moedge.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_inspect_and_eval_round_trip(tmp_path, capsys):
    out_dir = tmp_path / "tiny"
    code, out, _ = _run(capsys, "-q", "export", "tiny-mixtral", "-o", str(out_dir))
    assert code == 0 and "experts per layer [4]" in out
    code, out, _ = _run(capsys, "inspect", str(out_dir))
    assert code == 0 and "MoE: 2 layers, experts per layer [4]" in out
    results = {}
    for backend, model in (("ort", str(out_dir)), ("torch", "tiny-mixtral")):
        record = tmp_path / f"{backend}.json"
        code, out, _ = _run(
            capsys,
            "-q",
            "eval",
            model,
            "--data",
            "demo",
            "--seqlen",
            "64",
            "--max-windows",
            "3",
            "--json",
            str(record),
        )
        assert code == 0 and "seqlen 64, 3 windows, 189 predicted tokens" in out
        results[backend] = json.loads(record.read_text())
    assert results["ort"]["perplexity"] == pytest.approx(results["torch"]["perplexity"], rel=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "no-such-model", "--data", "demo"], "unknown model 'no-such-model'"),
        (["eval", "./missing.gguf", "--data", "demo"], "does not exist"),
        (["export", "tiny-llama", "-o", "/proc/moedge-out"], "not writable"),
        (["eval", "tiny-llama", "--data", "nowhere-dataset"], "dataset not found"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    code, _, err = _run(capsys, *argv)
    assert code == 1
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_corrupt_files_are_clear_errors(tmp_path, capsys):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF not really")
    code, _, err = _run(capsys, "eval", str(gguf), "--data", "demo")
    assert code == 1 and "not a readable GGUF" in err
    ckpt = tmp_path / "model.bin"
    ckpt.write_bytes(b"\x40\x00\x00\x00" * 7 + b"\x00" * 100)
    code, _, err = _run(capsys, "eval", str(ckpt), "--data", "demo")
    assert code == 1 and "corrupt or truncated" in err
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = _run(capsys, "eval", str(folder), "--data", "demo")
    assert code == 1 and "unsupported architecture 'gpt2'" in err and "mixtral" in err
    onnx_dir = tmp_path / "bad-export"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"junk")
    (onnx_dir / "config.json").write_text("{}")
    code, _, err = _run(capsys, "eval", str(onnx_dir), "--data", "demo")
    assert code == 1 and "not a moedge export" in err


def test_usage_error_exits_2():
    result = subprocess.run([sys.executable, "-m", "moedge", "export"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_calibrate_export_split_inspect_on_a_tiny_moe(tmp_path, capsys):
    recipe, export, bundle = tmp_path / "recipe", tmp_path / "export", tmp_path / "bundle"
    code, _, err = _run(
        capsys,
        *["-q", "calibrate", "tiny-olmoe", "-o", str(recipe), "--method", "rtn"],
        *["--calib-data", "demo", "--calib-windows", "4", "--seqlen", "32"],
    )
    assert code == 0, err
    code, out, err = _run(capsys, "-q", "export", "tiny-olmoe", "--recipe", str(recipe), "-o", str(export))
    assert code == 0, err
    assert json.loads((export / "config.json").read_text())["moedge"]["precision"] == "w8a8"
    assert (export / "routing.json").is_file()  # the recipe's routing statistics travel on
    code, out, err = _run(capsys, "-q", "split", str(export), "-o", str(bundle))
    assert code == 0 and "2 layer stages, 16 expert graphs" in out and "precision w8a8" in out
    code, out, _ = _run(capsys, "inspect", str(bundle))
    assert code == 0 and "16 experts in 2 MoE layers" in out
    assert "int8 kernels {'MatMulIntegerToFloat': 3}" in out  # every expert linear runs in int8
    assert "TensorRT lint: 0 errors" in out
    ppl = {}
    for name, folder in (("export", export), ("bundle", bundle)):
        record = tmp_path / f"{name}.json"
        code, out, err = _run(
            capsys,
            *["-q", "eval", str(folder), "--data", "demo", "--seqlen", "32", "--max-windows", "2"],
            *["--json", str(record)],
        )
        assert code == 0, err
        ppl[name] = json.loads(record.read_text())
    assert ppl["bundle"]["backend"] == "bundle, onnxruntime cpu w8a8"
    assert ppl["bundle"]["perplexity"] == pytest.approx(ppl["export"]["perplexity"], rel=1e-4)
    code, _, err = _run(capsys, "-q", "split", str(export), "-o", str(bundle))
    assert code == 1 and "not an empty folder" in err
    code, _, err = _run(
        capsys, "-q", "export", "tiny-llama", "--recipe", str(recipe), "-o", str(tmp_path / "x")
    )
    assert code == 1 and "recipe" in err and not (tmp_path / "x").exists()


def test_choices_come_from_the_registries(capsys):
    from moedge.calibration.config import ACT_CLIPS
    from moedge.calibration.rotation import ROTATIONS
    from moedge.cli import calibrate
    from moedge.formats.recipe import METHODS
    from moedge.runtime.backends import BACKENDS
    from moedge.runtime.policies import POLICIES

    # moedge.cli.calibrate spells these out (the calibrator imports torch; `moedge --help` must not)
    assert calibrate.METHODS == METHODS and calibrate.ACT_CLIPS == ACT_CLIPS
    assert calibrate.ROTATIONS == ROTATIONS
    for flag, names in (("--policy", list(POLICIES)), ("--backend", ["auto", *BACKENDS])):
        code, _, err = _run(capsys, "run", "B", flag, "nope")
        assert code == 2 and f"(choose from {', '.join(map(repr, names))})" in err


def test_bench_is_not_a_subcommand(capsys):
    # benchmarks live in benchmarks/ of the repository (python benchmarks/runtime_bench.py)
    code, _, err = _run(capsys, "bench", "runtime", "--bundle", "B")
    assert code == 2 and "invalid choice: 'bench'" in err and len(err.strip().splitlines()) == 1
