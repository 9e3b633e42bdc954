"""Hugging Face sources: a local model folder, or a hub id where a hub is reachable."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from moedge._errors import MoedgeError
from moedge.arch import get_config
from moedge.model import LoadedModel
from moedge.sources.limits import check_hf_config

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_architecture(model_type: str | None, where: str) -> None:
    """Refuse a config without a ``model_type`` or with one moedge does not support."""
    if model_type is None:
        raise MoedgeError(f"{where} has no model_type: it is not a Hugging Face causal LM config")
    get_config(model_type)  # raises with the supported list


def _warn_auto_map(path: Path, docs: dict[str, dict[str, object]], model_type: str | None) -> None:
    """One warning line when config.json or tokenizer_config.json asks for code from the model folder."""
    having = [name for name, doc in docs.items() if isinstance(doc, dict) and "auto_map" in doc]
    if having:
        log.warning(
            "%s: %s %s an auto_map (code in the model folder): ignored; moedge never runs code from a model "
            "folder and loads it with the built-in transformers classes for %r",
            path,
            " and ".join(having),
            "has" if len(having) == 1 else "have",
            model_type,
        )


def _read_json_file(path: Path, what: str) -> dict[str, object]:
    from moedge.inputs import read_input_json

    doc = read_input_json(path, what)
    if not isinstance(doc, dict):
        raise MoedgeError(f"{what} {path} is not a JSON object")
    return doc


def tokenizer_from_transformers(source: str, **kwargs: object) -> tuple[object, object]:
    from transformers import AutoTokenizer

    try:
        hf_tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    except Exception as exc:
        raise MoedgeError(f"cannot load the tokenizer of {source}: {exc}") from None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise MoedgeError(f"{source} has no fast (tokenizers) tokenizer; moedge ships tokenizer.json only")
    return hf_tok, backend


def finish(model: object, hf_tok: object, backend: object, *, name: str, source: str) -> LoadedModel:
    import torch

    assert isinstance(model, torch.nn.Module)
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):  # GGUF weights arrive dequantized; the flag must not travel
        del config.quantization_config
    return LoadedModel(
        model=model.eval(),  # type: ignore[arg-type]
        tokenizer=backend,  # type: ignore[arg-type]
        name=name,
        source=source,
        bos_token_id=getattr(hf_tok, "bos_token_id", None) or getattr(config, "bos_token_id", None),
        eos_token_id=getattr(hf_tok, "eos_token_id", None) or getattr(config, "eos_token_id", None),
        provenance={"source": source},
    )


def load_hf_folder(path: Path) -> LoadedModel:
    """Load a local Hugging Face model folder (``config.json`` + weights + tokenizer).

    config.json is checked (architecture, ``check_hf_config`` bounds against the weight files' size)
    before torch or transformers load or allocate anything; no code from the folder ever runs.
    """
    config_file = path / "config.json"
    if not os.path.lexists(config_file):
        raise MoedgeError(f"{path} is not a Hugging Face model folder: config.json is missing")
    config = _read_json_file(config_file, "model config")
    tok_config_file = path / "tokenizer_config.json"
    tok_config = _read_json_file(tok_config_file, "tokenizer config") if tok_config_file.exists() else {}
    model_type = config.get("model_type")
    check_architecture(model_type if isinstance(model_type, str) else None, str(config_file))
    _warn_auto_map(path, {"config.json": config, "tokenizer_config.json": tok_config}, str(model_type))
    for entry in path.iterdir():  # transformers opens what it finds: a FIFO or a device would block it
        if entry.exists() and not (entry.is_file() or entry.is_dir()):
            raise MoedgeError(f"{entry} in the model folder is not a regular file (a device, FIFO or socket)")
    weight_files = [f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    check_hf_config(config, str(config_file), weight_bytes=sum(f.stat().st_size for f in weight_files))
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    except Exception as exc:
        raise MoedgeError(f"cannot load the weights in {path}: {exc}") from None
    hf_tok: object
    backend: object
    if (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        from moedge.tokenizer import load_tokenizer

        hf_tok, backend = None, load_tokenizer(path / "tokenizer.json")
    else:
        hf_tok, backend = tokenizer_from_transformers(str(path))
    loaded = finish(model, hf_tok, backend, name=path.name, source=str(path))
    build_info = path / "moedge_build.json"
    if build_info.exists():
        loaded.provenance.update(_read_json_file(build_info, "build record"))
    return loaded


def load_hub(repo_id: str, *, sources_help: str) -> LoadedModel:
    """Load a hub id where the machine reaches a hub (never on these offline machines).

    ``sources_help`` lists what else a model may be, for the error when the hub does not answer.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(repo_id, trust_remote_code=False)
    except Exception as exc:
        raise MoedgeError(
            f"unknown model '{repo_id}': not a test bed or local path, and the hub did not answer "
            f"({type(exc).__name__}). Give {sources_help}"
        ) from None
    check_architecture(getattr(config, "model_type", None), repo_id)
    _warn_auto_map(Path(repo_id), {"config.json": config.to_dict()}, str(config.model_type))
    check_hf_config(config.to_dict(), repo_id)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32, trust_remote_code=False)
    hf_tok, backend = tokenizer_from_transformers(repo_id)
    return finish(model, hf_tok, backend, name=repo_id.split("/")[-1], source=repo_id)
