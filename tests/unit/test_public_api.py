"""The public surface is small and explicit, and importing it does not pull in torch."""

from __future__ import annotations

import subprocess
import sys

import moedge


def test_public_api_surface():
    assert sorted(moedge.__all__) == sorted(
        [
            "BundleRunner",
            "CalibrationConfig",
            "ExportResult",
            "LoadedModel",
            "MoedgeError",
            "OrtCausalLM",
            "PerplexityResult",
            "__version__",
            "apply_recipe",
            "calibrate",
            "export_model",
            "load_model",
            "perplexity",
            "save_recipe",
            "split_bundle",
        ]
    )
    for name in moedge.__all__:
        assert getattr(moedge, name) is not None


def test_import_is_light():
    code = "import sys, moedge, moedge.runtime; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
