"""moedge-run on the CUDA execution provider: the same greedy tokens as on the CPU (tiny-mixtral)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "build" / "cpp" / "moedge-run"


def _gpu_library() -> str:
    import onnxruntime as ort

    lib = next(Path(ort.__file__).parent.joinpath("capi").glob("libonnxruntime.so.1*"), None)
    if lib is None:
        pytest.skip("this onnxruntime-gpu wheel ships no libonnxruntime.so.1")
    return str(lib)


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [None, "50%"])
def test_cuda_provider_generates_the_cpu_tokens(bundles, tmp_path, budget):
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} is not built: run `make cpp`")
    bundle = bundles("mixtral")
    extra = [] if budget is None else ["--gpu-budget", budget]
    runs = {}
    for provider in ("cpu", "cuda"):
        out = tmp_path / f"{provider}.json"
        result = subprocess.run(
            [str(BINARY), str(bundle), "--ids", "1,17,33,50,7", "--ids", "3,99,140", "-n", "16",
             "--provider", provider, "--ort-lib", _gpu_library(), "--json", str(out), *extra],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[provider] = json.loads(out.read_text())
    assert [g["token_ids"] for g in runs["cuda"]["generations"]] == [
        g["token_ids"] for g in runs["cpu"]["generations"]
    ]
