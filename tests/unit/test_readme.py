"""The README: its Python snippet runs as written, its links (and docs/*.md links) resolve, it stays short."""

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


README_MAX_LINES = 200
_FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", flags=re.M)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks; code spans become a placeholder (link text may hold them)."""
    return _CODE_SPAN.sub("code", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for title in _HEADING.findall(_FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", "")).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _docs() -> list[Path]:
    return [README, *sorted((README.parent / "docs").glob("*.md"))]


def test_readme_and_docs_links_resolve_inside_the_repository():
    root = README.parent.resolve()
    bad = []
    for doc in _docs():
        for target in _LINK.findall(_prose(doc.read_text())):
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, fragment = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc.resolve()
            where = f"{doc.relative_to(root)}: ({target})"
            if not dest.is_relative_to(root):
                bad.append(f"{where} leaves the repository")
            elif not dest.exists():
                bad.append(f"{where} does not exist")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                bad.append(f"{where} names no heading of {dest.relative_to(root)}")
    assert not bad, "\n".join(bad)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"
    )
