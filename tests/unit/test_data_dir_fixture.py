"""The ``data_dir`` fixture: real-data tests skip when MOEDGE_DATA is unset, fail when it names no folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
# Plugins the probe does not need: without hypothesis's (about 1.5 s to import) a run takes about 1 s.
NO_PLUGINS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio")


def _run(folder: Path, data: str | None) -> subprocess.CompletedProcess[str]:
    """pytest in a fresh process on ``folder`` (the suite's conftest and one real-data test)."""
    env = {k: v for k, v in os.environ.items() if k != "MOEDGE_DATA"}
    if data is not None:
        env["MOEDGE_DATA"] = data
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", *NO_PLUGINS, str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data-dir-probe")
    shutil.copy(CONFTEST, folder / "conftest.py")
    (folder / "test_probe.py").write_text("def test_needs_data(data_dir):\n    assert data_dir.is_dir()\n")
    return folder


def test_missing_folder_fails_instead_of_skipping(probe: Path, tmp_path: Path) -> None:
    result = _run(probe, str(tmp_path / "no-such-data"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout and "skipped" not in result.stdout
    assert "is not a folder" in result.stdout


@pytest.mark.parametrize("data", [None, ""])
def test_unset_skips_with_the_reason(probe: Path, data: str | None) -> None:
    result = _run(probe, data)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "MOEDGE_DATA is not set" in result.stdout


def test_an_existing_folder_runs(probe: Path, tmp_path: Path) -> None:
    result = _run(probe, str(tmp_path))
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
