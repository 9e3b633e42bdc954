"""Where moedge keeps its cache and finds evaluation data."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moedge._errors import MoedgeError

CACHE_ENV = "MOEDGE_CACHE"
DATA_ENV = "MOEDGE_DATA"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder for built test beds and demo artifacts.

    Precedence: the explicit argument, then ``$MOEDGE_CACHE``, then ``$XDG_CACHE_HOME/moedge``,
    then ``~/.cache/moedge``.
    """
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moedge"


def data_dir(override: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the data folder laid out like ``shared/data`` (flag, then ``$MOEDGE_DATA``), or None."""
    candidate = override if override is not None else os.environ.get(DATA_ENV)
    if not candidate:
        return None
    path = Path(candidate).expanduser()
    if not path.is_dir():
        raise MoedgeError(
            f"data folder {path} does not exist: pass --data-dir (or set {DATA_ENV}) to a folder laid out "
            "like shared/data (wikitext-2-raw/, ptb/, c4/)"
        )
    return path


def ensure_writable_dir(path: Path) -> None:
    """Fail early, with one clear message, when ``path`` cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".moedge-write-test-"):
            pass
    except OSError as exc:
        raise MoedgeError(
            f"output path {path} is not writable ({exc.strerror or exc}): choose another -o folder"
        ) from None


def check_new_output(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, or a clear error when it exists and is not an empty folder."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoedgeError(f"{out} exists and is not an empty folder: choose a new output path")
    return out


@contextmanager
def atomic_folder(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; it becomes ``out`` only if the block succeeds.

    An existing empty ``out`` is replaced; a non-empty one only with ``replace``. On failure the
    temporary folder is removed, so nothing half-written is left.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if replace:
                shutil.rmtree(out)
            else:
                out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
