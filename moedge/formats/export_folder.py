"""The exported folder (``moedge export`` output): its file names, format version, reader and writer.

``config.json`` is the model's Hugging Face config with a ``moedge`` section (``ExportInfo``) added;
``model.onnx`` (+ ``model.onnx.data``) the graph; ``tokenizer.json``; ``routing.json`` when the
export came from a calibration recipe that recorded routing. Read without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError
from moedge.formats.routing import ROUTING_FILE

EXPORT_FORMAT_VERSION = 1
"""The ``moedge.format_version`` this moedge writes, and the newest it reads."""
CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = MODEL_FILE + ".data"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_FILES = (CONFIG_FILE, MODEL_FILE, MODEL_DATA_FILE, TOKENIZER_FILE, ROUTING_FILE)
"""Every file an export holds (``routing.json`` only for a recipe that has one)."""
META_KEY = "moedge"
"""The section of ``config.json`` that ``ExportInfo`` reads."""


@dataclass(frozen=True)
class ExportInfo:
    """The ``moedge`` section of an exported folder's ``config.json`` (``raw``), and the whole file (``config``)."""

    folder: Path
    with_cache: bool
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    name: str
    raw: dict[str, Any]
    config: dict[str, Any]

    @property
    def model_file(self) -> Path:
        """The ONNX graph."""
        return self.folder / MODEL_FILE

    @property
    def tokenizer_file(self) -> Path:
        """The tokenizer shipped with the export."""
        return self.folder / TOKENIZER_FILE

    @property
    def routing_file(self) -> Path | None:
        """The recipe's routing statistics, when the export carries them."""
        path = self.folder / ROUTING_FILE
        return path if path.is_file() else None


def is_exported_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like a moedge export (so CLI commands can route it to ONNX Runtime)."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()


def read_export_info(folder: str | Path) -> ExportInfo:
    """Parse and validate an exported folder's metadata, with one clear error for what is wrong."""
    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    if not (folder / MODEL_FILE).is_file():
        raise MoedgeError(f"{folder} holds no {MODEL_FILE}: export a model there first (moedge export)")
    try:
        config = json.loads(config_file.read_text())
        meta = config[META_KEY]
    except FileNotFoundError:
        raise MoedgeError(f"{config_file} is missing: re-export the model (moedge export)") from None
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise MoedgeError(f"{config_file} is corrupt or not a moedge export ({exc})") from None
    try:
        version = int(meta.get("format_version", 0))
    except (AttributeError, TypeError, ValueError):
        raise MoedgeError(
            f"{config_file}: field moedge.format_version is not an integer: re-export"
        ) from None
    if version > EXPORT_FORMAT_VERSION:
        raise MoedgeError(
            f"{folder} uses export format {version}, newer than this moedge reads ({EXPORT_FORMAT_VERSION}): "
            "upgrade moedge"
        )
    try:
        return _export_info(folder, config, meta)
    except (KeyError, TypeError, ValueError) as exc:
        field = f"field {exc.args[0]!r} " if isinstance(exc, KeyError) else ""
        raise MoedgeError(
            f"{config_file}: {field}is missing or mistyped ({type(exc).__name__}): re-export the model"
        ) from None


def _export_info(folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> ExportInfo:
    return ExportInfo(
        folder=folder,
        with_cache=bool(meta["with_cache"]),
        inputs=tuple(meta["inputs"]),
        outputs=tuple(meta["outputs"]),
        num_layers=int(meta["num_layers"]),
        num_kv_heads=int(meta["num_kv_heads"]),
        head_dim=int(meta["head_dim"]),
        vocab_size=int(config["vocab_size"]),
        bos_token_id=meta.get("bos_token_id"),
        eos_token_id=meta.get("eos_token_id"),
        name=str(meta.get("name", folder.name)),
        raw=meta,
        config=config,
    )


def previous_export_files(folder: Path) -> tuple[str, ...] | None:
    """The files of a previous export in ``folder`` (config.json with a ``moedge`` key and model.onnx)."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or META_KEY not in config or not (folder / MODEL_FILE).is_file():
        return None
    return EXPORT_FILES


def write_export_config(folder: Path, hf_config: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write ``config.json``: the HF config with ``meta`` (``format_version`` set here) as its ``moedge`` section."""
    doc = dict(hf_config)
    doc[META_KEY] = {"format_version": EXPORT_FORMAT_VERSION, **meta}
    (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=2, default=str))
