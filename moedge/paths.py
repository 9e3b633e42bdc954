"""Where moedge keeps its cache and finds evaluation data, and how it writes outputs without losing data.

Every output is written to a temporary sibling named ``.NAME.moedge-tmp-<pid>-<start>-<random>`` and
renamed into place at the end, so a failure or a kill never leaves a half-written output at ``NAME``.
``<start>`` is the writer's start time (``/proc/<pid>/stat`` field 22 on Linux, 0 elsewhere): the next
write to the same target removes a temporary sibling only when its writer is gone. Outputs follow the
umask (folders ``0o777 & ~umask``, files ``0o666 & ~umask``). Nothing is written inside a bundle
(a folder whose ``manifest.json`` lists every file with its sha256) except by
``moedge profile --update-bundle``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from moedge._errors import MoedgeError

CACHE_ENV = "MOEDGE_CACHE"
DATA_ENV = "MOEDGE_DATA"
TEMP_MARK = "moedge-tmp"
_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\." + TEMP_MARK + r"-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}(?:\.[A-Za-z0-9]+)?$"
)


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


# --- bundles: folders nothing writes into ------------------------------------------------------------


def _holds_manifest(folder: Path) -> bool:
    """Whether ``folder`` holds a moedge bundle manifest (a damaged one counts)."""
    from moedge.formats.manifest import BUNDLE_FORMAT, MANIFEST_FILE

    path = folder / MANIFEST_FILE
    try:
        if not path.is_file():
            return False
        data = path.read_bytes()
    except OSError:
        return False
    if BUNDLE_FORMAT.encode() not in data:
        return False
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return True  # a truncated or damaged moedge manifest is still a bundle's
    return isinstance(raw, dict) and raw.get("format") == BUNDLE_FORMAT


def bundle_root(path: str | os.PathLike[str], *, include_self: bool = True) -> Path | None:
    """The bundle folder that ``path`` (resolved) is, or is inside, or None.

    With ``include_self=False`` only the ancestors of ``path`` count.
    """
    resolved = Path(path).expanduser().resolve()
    candidates = [resolved, *resolved.parents] if include_self else list(resolved.parents)
    return next((folder for folder in candidates if _holds_manifest(folder)), None)


def refuse_inside_bundle(
    path: str | os.PathLike[str], *, flag: str = "-o", include_self: bool = True
) -> None:
    """Raise one clear line when the output ``path`` is, or is inside, a bundle."""
    root = bundle_root(path, include_self=include_self)
    if root is None:
        return
    where = (
        "is the moedge bundle" if root == Path(path).expanduser().resolve() else "is inside the moedge bundle"
    )
    raise MoedgeError(
        f"{flag} {path} {where} {root}, whose files manifest.json lists by sha256: write it elsewhere "
        f"(`moedge profile {root} --update-bundle` writes routing.json and a plan into the bundle)"
    )


# --- temporary siblings ------------------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def _pid_exists(pid: int) -> bool:
    if os.name != "posix":
        return True  # no safe probe (os.kill with 0 terminates on Windows): keep the writer's files
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: another user's live process
    return True


def writer_gone(pid: int, start: int) -> bool:
    """Whether the process that wrote a temporary sibling (its ``pid`` and start time) has ended.

    On Linux a live ``pid`` with another start time is a different process (the pid was reused);
    elsewhere, and where ``/proc`` is hidden, only a ``pid`` that no longer exists counts as gone.
    """
    now = _start_time(pid)
    if now is not None and start:
        return now != start
    return not _pid_exists(pid)


def temp_sibling(target: Path, suffix: str = "") -> Path:
    """A fresh temporary name next to ``target``: ``.NAME.moedge-tmp-<pid>-<start>-<random><suffix>``."""
    pid = os.getpid()
    stamp = f"{pid}-{_start_time(pid) or 0}-{secrets.token_hex(4)}"
    return target.parent / f".{target.name}.{TEMP_MARK}-{stamp}{suffix}"


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` whose writer process is gone; returns them."""
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["name"] != target.name:
            continue
        if not writer_gone(int(match["pid"]), int(match["start"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def new_temp_file(target: Path, suffix: str = "") -> Path:
    """Create an empty temporary sibling file of ``target`` (mode ``0o666 & ~umask``) and return it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_sibling(target, suffix)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _new_temp_dir(target: Path) -> Path:
    while True:
        tmp = temp_sibling(target)
        try:
            os.mkdir(tmp, 0o777)  # the umask applies, as for any folder the user creates
        except FileExistsError:
            continue
        return tmp


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block succeeds.

    ``suffix`` ends the temporary name (for writers that append one, e.g. numpy's ``.npz``). Stale
    temporary siblings of ``path`` are removed first; on failure the temporary file is removed, so
    ``path`` is either the old file or the complete new one. A path inside a bundle is refused.
    """
    target = Path(path).expanduser()
    refuse_inside_bundle(target, flag="output")
    if target.is_dir():
        raise MoedgeError(f"{target} is a folder: give a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = new_temp_file(target, suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path).expanduser()


# --- output folders ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputKind:
    """What a command writes as a folder, so ``--overwrite`` replaces only a previous output of its own.

    ``owned(folder)`` returns the relative paths (``/``-separated) of the files that command writes
    there, or None when ``folder`` is not such an output. ``bundle`` marks the bundle kind, whose
    output folder is itself a bundle.
    """

    what: str
    owned: Callable[[Path], Collection[str] | None]
    bundle: bool = False


def _entries(folder: Path) -> set[str]:
    """Every file, link and empty folder under ``folder``, relative and ``/``-separated."""
    out: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=False):
        here = Path(top)
        rel = here.relative_to(folder)
        if not dirs and not files and here != folder:
            out.add(rel.as_posix() + "/")
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            out.add((rel / name).as_posix())
    return out


def check_replaceable(folder: Path, kind: OutputKind) -> None:
    """Raise one clear line unless ``folder`` holds only files ``kind``'s command writes."""
    owned = kind.owned(folder)
    if owned is None:
        raise MoedgeError(
            f"{folder} is not a {kind.what}: --overwrite replaces only a previous {kind.what}; "
            "choose a new output path"
        )
    foreign = sorted(_entries(folder) - set(owned))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MoedgeError(
            f"{folder} holds files that are not part of a {kind.what} ({shown}): --overwrite would "
            "delete them; move them or choose a new output path"
        )


def check_output_folder(
    path: str | os.PathLike[str], *, kind: OutputKind | None = None, overwrite: bool = False
) -> Path:
    """``path`` as a Path, or one clear error when writing a folder there could lose data.

    Refused: a path that is, or is inside, a bundle (for the bundle kind: inside another bundle); a
    file; a non-empty folder, unless ``overwrite`` and it is a previous output of ``kind`` holding
    nothing else.
    """
    out = Path(path).expanduser()
    refuse_inside_bundle(out, include_self=not (kind is not None and kind.bundle))
    if out.is_symlink() and not out.exists():
        raise MoedgeError(f"{out} is a dangling link: choose a new output path")
    if out.exists() and not out.is_dir():
        raise MoedgeError(f"output path {out} is a file: choose a folder for -o")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            hint = f" (or --overwrite to replace a previous {kind.what})" if kind is not None else ""
            raise MoedgeError(f"{out} exists and is not an empty folder: choose a new output path{hint}")
        if kind is None:
            raise MoedgeError(f"{out} exists and is not an empty folder: choose a new output path")
        check_replaceable(out, kind)
    return out


def check_new_output(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, or a clear error when it exists and is not an empty folder (or is in a bundle)."""
    return check_output_folder(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out`` (a non-empty folder already checked as replaceable)."""
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the replaced output
        return
    old = temp_sibling(out)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(out: Path, *, kind: OutputKind | None = None, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; it becomes ``out`` only if the block succeeds.

    A missing or empty ``out`` is replaced. A non-empty one only with ``replace``, and only when it
    is a previous output of ``kind`` holding nothing else (checked again just before the swap): the
    finished folder and the old one are exchanged, then the old one is removed. On failure the
    temporary folder is removed, so nothing half-written is left. Stale temporary siblings of ``out``
    (their writer gone) are removed first.
    """
    out = Path(out)
    refuse_inside_bundle(out, include_self=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = _new_temp_dir(out)
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink() and any(out.iterdir()):
            if not replace or kind is None:
                raise MoedgeError(
                    f"{out} was filled by something else while moedge wrote it: nothing was replaced; "
                    "choose a new output path"
                )
            check_replaceable(out, kind)
            _swap_in(tmp, out)
        else:
            if out.is_dir() and os.name != "posix":
                out.rmdir()  # POSIX rename replaces an empty folder in one step
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
