"""Reading an exported model folder (``model.onnx`` + ``config.json`` + ``tokenizer.json``) without torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError

SUPPORTED_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportInfo:
    """The ``moedge`` section of an exported folder's ``config.json``."""

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

    @property
    def model_file(self) -> Path:
        """The ONNX graph."""
        return self.folder / "model.onnx"

    @property
    def tokenizer_file(self) -> Path:
        """The tokenizer shipped with the export."""
        return self.folder / "tokenizer.json"


def is_exported_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like a moedge export (so CLI commands can route it to ONNX Runtime)."""
    path = Path(path)
    return path.is_dir() and (path / "model.onnx").is_file() and (path / "config.json").is_file()


def read_export_info(folder: str | Path) -> ExportInfo:
    """Parse and validate an exported folder's metadata, with one clear error for what is wrong."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not (folder / "model.onnx").is_file():
        raise MoedgeError(f"{folder} holds no model.onnx: export a model there first (moedge export)")
    try:
        config = json.loads(config_file.read_text())
        meta = config["moedge"]
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
    if version > SUPPORTED_FORMAT_VERSION:
        raise MoedgeError(
            f"{folder} uses export format {version}, newer than this moedge reads ({SUPPORTED_FORMAT_VERSION}): "
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
    )
