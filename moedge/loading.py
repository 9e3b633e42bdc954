"""``load_model``: one entry point for every model source moedge accepts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from moedge._errors import MoedgeError
from moedge.export.configs import get_config
from moedge.model import LoadedModel
from moedge.paths import cache_dir as default_cache_dir

log = logging.getLogger(__name__)

SOURCES_HELP = (
    "a test bed name ({beds}), a Hugging Face folder, a .gguf file, a llama2.c .bin checkpoint, "
    "or a hub id (org/name) where a hub is reachable"
)


def _sources_help() -> str:
    from moedge.testbeds import testbed_names

    return SOURCES_HELP.format(beds=", ".join(testbed_names()))


def _check_architecture(model_type: str | None, where: str) -> None:
    if model_type is None:
        raise MoedgeError(f"{where} has no model_type: it is not a Hugging Face causal LM config")
    get_config(model_type)  # raises with the supported list


def load_model(
    source: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> LoadedModel:
    """Load a causal LM in FP32 eval mode with its tokenizer.

    ``source`` is a test bed name, a Hugging Face folder, a ``.gguf`` file, a llama2.c ``.bin``
    checkpoint, or a hub id. Built test beds are cached under ``cache_dir`` (see ``moedge.paths``).
    """
    from moedge.testbeds import TESTBEDS

    text = str(source)
    if text.lower() in TESTBEDS:
        return TESTBEDS[text.lower()].build(default_cache_dir(cache_dir))
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return load_hf_folder(path)
        if path.suffix == ".gguf":
            return load_gguf(path)
        if path.suffix == ".bin":
            return load_llama2c_checkpoint(path)
        raise MoedgeError(f"cannot load {path}: expected {_sources_help()}")
    if text.endswith((".gguf", ".bin", ".json", ".safetensors")) or text.startswith((".", "/", "~")):
        raise MoedgeError(f"model file {path} does not exist")
    if "/" in text and text.count("/") == 1:
        return load_hub(text)
    raise MoedgeError(f"unknown model '{text}': give {_sources_help()}")


def _tokenizer_from_transformers(source: str, **kwargs: object) -> tuple[object, object]:
    from transformers import AutoTokenizer

    try:
        hf_tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise MoedgeError(f"cannot load the tokenizer of {source}: {exc}") from None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise MoedgeError(f"{source} has no fast (tokenizers) tokenizer; moedge ships tokenizer.json only")
    return hf_tok, backend


def _finish(model: object, hf_tok: object, backend: object, *, name: str, source: str) -> LoadedModel:
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
    """Load a local Hugging Face model folder (``config.json`` + weights + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    config_file = path / "config.json"
    if not config_file.is_file():
        raise MoedgeError(f"{path} is not a Hugging Face model folder: config.json is missing")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoedgeError(f"{config_file} is corrupt: {exc}") from None
    _check_architecture(model_type, str(config_file))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise MoedgeError(f"cannot load the weights in {path}: {exc}") from None
    hf_tok: object
    backend: object
    if (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        from moedge.tokenizer import load_tokenizer

        hf_tok, backend = None, load_tokenizer(path / "tokenizer.json")
    else:
        hf_tok, backend = _tokenizer_from_transformers(str(path))
    loaded = _finish(model, hf_tok, backend, name=path.name, source=str(path))
    build_info = path / "moedge_build.json"
    if build_info.is_file():
        loaded.provenance.update(json.loads(build_info.read_text()))
    return loaded


def load_gguf(path: Path) -> LoadedModel:
    """Load a ``.gguf`` file through transformers' GGUF loader (weights dequantized to FP32)."""
    import torch

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MoedgeError("GGUF loading needs gguf and accelerate: pip install 'moedge[export]'") from None
    from transformers import AutoModelForCausalLM

    try:
        from gguf import GGUFReader

        arch = str(GGUFReader(path).fields["general.architecture"].contents())
    except Exception as exc:
        raise MoedgeError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    _check_architecture(arch, str(path))
    log.info("loading %s (GGUF, dequantized to FP32)", path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise MoedgeError(f"cannot load GGUF {path}: {exc}") from None
    hf_tok, backend = _tokenizer_from_transformers(str(path.parent), gguf_file=path.name)
    return _finish(model, hf_tok, backend, name=path.stem, source=str(path))


def load_llama2c_checkpoint(path: Path) -> LoadedModel:
    """Load a llama2.c ``.bin`` with the ``tok512.model`` (or ``tokenizer.model``) beside it."""
    from moedge.llama2c import load_llama2c
    from moedge.tokenizer import sentencepiece_bpe_tokenizer

    model = load_llama2c(path)
    candidates = [path.parent / "tok512.model", path.parent / "tokenizer.model", *path.parent.glob("*.model")]
    tok_file = next((c for c in candidates if c.is_file()), None)
    if tok_file is None:
        raise MoedgeError(f"no SentencePiece tokenizer (*.model) next to {path}")
    return LoadedModel(
        model=model,
        tokenizer=sentencepiece_bpe_tokenizer(tok_file),
        name=path.stem,
        source=str(path),
        bos_token_id=1,
        eos_token_id=2,
        provenance={"source": str(path), "tokenizer": str(tok_file)},
    )


def load_hub(repo_id: str) -> LoadedModel:
    """Load a hub id where the machine reaches a hub (never on these offline machines)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(repo_id)
    except Exception as exc:
        raise MoedgeError(
            f"unknown model '{repo_id}': not a test bed or local path, and the hub did not answer "
            f"({type(exc).__name__}). Give {_sources_help()}"
        ) from None
    _check_architecture(getattr(config, "model_type", None), repo_id)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32)
    hf_tok, backend = _tokenizer_from_transformers(repo_id)
    return _finish(model, hf_tok, backend, name=repo_id.split("/")[-1], source=repo_id)
