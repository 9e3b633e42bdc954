"""The README's Python snippet runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its Python API example"
    code = blocks[0].replace("/tmp/tiny-mixtral-onnx", str(tmp_path / "tiny-mixtral-onnx"))
    for name in ("tiny-mixtral-recipe", "tiny-mixtral-qdq", "tiny-mixtral-bundle"):
        code = code.replace(f"/tmp/{name}", str(tmp_path / name))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "{0: 4, 1: 4}" in out


def test_readme_shows_the_ci_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README.read_text()
