"""``load_model``: one entry point for every model source moedge accepts.

The readers of each source live in ``moedge.sources`` (Hugging Face folder or hub id, GGUF, llama2.c);
the named test beds in ``moedge.testbeds``. This module only picks the right one.
"""

from __future__ import annotations

import os
from pathlib import Path

from moedge._errors import MoedgeError
from moedge.model import LoadedModel
from moedge.paths import cache_dir as default_cache_dir

SOURCES_HELP = (
    "a test bed name ({beds}), a Hugging Face folder, a .gguf file, a llama2.c .bin checkpoint, "
    "or a hub id (org/name) where a hub is reachable"
)


def _sources_help() -> str:
    from moedge.testbeds import testbed_names

    return SOURCES_HELP.format(beds=", ".join(testbed_names()))


def check_seqlen(seqlen: int, context: object, model: str, *, flag: str = "--seqlen") -> None:
    """Refuse a window longer than a model's context (``max_position_embeddings``), with one line."""
    if isinstance(context, int) and not isinstance(context, bool) and 0 < context < seqlen:
        raise MoedgeError(
            f"{flag} {seqlen} is longer than the context of {model} ({context} tokens, "
            f"max_position_embeddings): give {flag} {context} or less"
        )


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
    if os.path.lexists(path):
        return _load_path(path)
    if text.endswith((".gguf", ".bin", ".json", ".safetensors")) or text.startswith((".", "/", "~")):
        raise MoedgeError(f"model file {path} does not exist")
    if "/" in text and text.count("/") == 1:
        from moedge.sources.hf import load_hub

        return load_hub(text, sources_help=_sources_help())
    raise MoedgeError(f"unknown model '{text}': give {_sources_help()}")


def _load_path(path: Path) -> LoadedModel:
    """A model folder or file that exists, by its kind."""
    if path.is_dir():
        from moedge.sources.hf import load_hf_folder

        return load_hf_folder(path)
    from moedge.inputs import check_input_file

    check_input_file(path, "model file", limit=2**62)  # a regular file, never a FIFO or a device
    if path.suffix == ".gguf":
        from moedge.sources.gguf import load_gguf

        return load_gguf(path)
    if path.suffix == ".bin":
        from moedge.sources.llama2c import load_llama2c_checkpoint

        return load_llama2c_checkpoint(path)
    raise MoedgeError(f"cannot load {path}: expected {_sources_help()}")
