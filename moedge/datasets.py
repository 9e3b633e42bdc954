"""Evaluation and calibration text: WikiText-2, PTB, the C4 sample, a local file, or the shipped demo text."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from moedge._errors import MoedgeError
from moedge.paths import DATA_ENV
from moedge.paths import data_dir as resolve_data_dir

# Files inside a data folder laid out like shared/data.
_FILES = {
    "wikitext2": "wikitext-2-raw/wiki.test.raw",
    "ptb": "ptb/ptb.test.txt",
    "c4": "c4/c4_validation_2k.parquet",
}
C4_EVAL_DOCS = (1000, 2000)  # evaluation documents; 0-999 are for calibration and building routers
C4_BUILD_DOCS = (0, 1000)
DATASET_NAMES = ("wikitext2", "ptb", "c4", "demo")


@dataclass(frozen=True)
class Text:
    """A text to evaluate on or calibrate with, and where it came from."""

    name: str
    text: str
    origin: str


def demo_text() -> Text:
    """The short sample shipped with moedge (written for the demo; no published figure uses it)."""
    body = resources.files("moedge").joinpath("data/demo_text.txt").read_text(encoding="utf-8")
    return Text("demo", body, "moedge/data/demo_text.txt (shipped sample)")


def c4_documents(start: int, stop: int, *, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Documents ``start``..``stop-1`` of the 2,000-document C4 sample."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise MoedgeError(f"the C4 sample needs a data folder: pass --data-dir or set {DATA_ENV}")
    path = root / _FILES["c4"]
    if not path.is_file():
        raise MoedgeError(f"dataset not found: {path} is missing")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MoedgeError("reading the C4 parquet needs pyarrow: pip install 'moedge[export]'") from None
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [str(t) for t in texts[start:stop]]


def load_text(name: str, *, data_dir: str | os.PathLike[str] | None = None) -> Text:
    """Resolve ``name`` (wikitext2, ptb, c4, demo, or a path to a text file) to its evaluation text."""
    path = Path(name).expanduser()
    if name not in DATASET_NAMES:
        if os.path.lexists(path):  # a text file: read only when regular and at most 64 MiB
            from moedge.inputs import read_input_text

            return Text(path.name, read_input_text(path, "text file"), str(path))
        raise MoedgeError(
            f"dataset not found: '{name}' is neither one of {', '.join(DATASET_NAMES)} nor an existing text file"
        )
    if name == "demo":
        return demo_text()
    root = resolve_data_dir(data_dir)
    if root is None:
        return _from_hub(name)
    if name == "c4":
        lo, hi = C4_EVAL_DOCS
        docs = c4_documents(lo, hi, data_dir=root)
        return Text("c4", "\n\n".join(docs), f"{root / _FILES['c4']} documents {lo}-{hi - 1}")
    path = root / _FILES[name]
    if not path.is_file():
        raise MoedgeError(f"dataset not found: {path} is missing from the data folder {root}")
    return Text(name, path.read_text(encoding="utf-8"), str(path))


def _from_hub(name: str) -> Text:
    """Fall back to the `datasets` library where a hub is reachable."""
    hint = f"dataset not found: no data folder given (pass --data-dir or set {DATA_ENV} to shared/data)"
    try:
        from datasets import load_dataset  # type: ignore[import-not-found]
    except ImportError:
        raise MoedgeError(hint) from None
    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
            return Text(name, "".join(rows), "hub: wikitext-2-raw-v1 test")
        if name == "ptb":
            rows = load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"]
            return Text(name, "\n".join(rows), "hub: ptb_text_only test")
    except Exception as exc:
        raise MoedgeError(f"{hint}; the hub failed too ({type(exc).__name__})") from None
    raise MoedgeError(hint)


def windows(ids: np.ndarray, seqlen: int, *, max_windows: int | None = None) -> np.ndarray:
    """Cut ``ids`` into non-overlapping windows of ``seqlen`` tokens (the tail shorter than one is dropped)."""
    if seqlen < 2:
        raise MoedgeError(f"--seqlen must be at least 2 (got {seqlen})")
    count = len(ids) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise MoedgeError(
            f"the text has {len(ids)} tokens, fewer than one window of {seqlen}: lower --seqlen"
        )
    return np.asarray(ids[: count * seqlen], dtype=np.int64).reshape(count, seqlen)


def sample_windows(ids: np.ndarray, count: int, seqlen: int, *, seed: int) -> np.ndarray:
    """Draw ``count`` windows of ``seqlen`` tokens at seeded random offsets (calibration-style sampling)."""
    if len(ids) <= seqlen:
        raise MoedgeError(f"need more than {seqlen} tokens to sample windows, got {len(ids)}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=count)
    return np.stack([np.asarray(ids[s : s + seqlen], dtype=np.int64) for s in starts])
