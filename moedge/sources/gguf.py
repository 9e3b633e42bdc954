"""GGUF sources: a ``.gguf`` file, its header bounded before transformers dequantizes it."""

from __future__ import annotations

import logging
from pathlib import Path

from moedge._errors import MoedgeError
from moedge.model import LoadedModel
from moedge.sources.hf import check_architecture, finish, tokenizer_from_transformers
from moedge.sources.limits import (
    MAX_CONTEXT,
    MAX_DIM,
    MAX_EXPERTS,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_VOCAB,
    check_header_value,
)

log = logging.getLogger(__name__)


def load_gguf(path: Path) -> LoadedModel:
    """Load a ``.gguf`` file through transformers' GGUF loader (weights dequantized to FP32).

    The header is checked (``check_gguf_header``) before torch or transformers load or allocate anything.
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MoedgeError("GGUF loading needs gguf and accelerate: pip install 'moedge[export]'") from None
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        arch = str(reader.fields["general.architecture"].contents())
    except Exception as exc:
        raise MoedgeError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    check_architecture(arch, str(path))
    check_gguf_header(reader, arch, str(path))
    del reader
    import torch
    from transformers import AutoModelForCausalLM

    log.info("loading %s (GGUF, dequantized to FP32)", path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, trust_remote_code=False
        )
    except Exception as exc:
        raise MoedgeError(f"cannot load GGUF {path}: {exc}") from None
    hf_tok, backend = tokenizer_from_transformers(str(path.parent), gguf_file=path.name)
    return finish(model, hf_tok, backend, name=path.stem, source=str(path))


def _gguf_value(reader: object, key: str) -> object:
    field = reader.fields.get(key)  # type: ignore[attr-defined]
    if field is None:
        return None
    try:
        value = field.contents()
    except Exception:
        return "unreadable"
    if isinstance(value, list):  # per-layer values (some architectures): bound the largest
        numbers = [v for v in value if isinstance(v, int | float)]
        return max(numbers) if numbers and len(numbers) == len(value) else value
    return value


def check_gguf_header(reader: object, arch: str, where: str) -> None:
    """Bound a GGUF header's sizes and check its tensors hold every block it claims, before any allocation."""
    fields = {
        "block_count": MAX_LAYERS,
        "embedding_length": MAX_DIM,
        "feed_forward_length": MAX_DIM,
        "expert_feed_forward_length": MAX_DIM,
        "attention.head_count": MAX_HEADS,
        "attention.head_count_kv": MAX_HEADS,
        "context_length": MAX_CONTEXT,
        "expert_count": MAX_EXPERTS,
        "expert_used_count": MAX_EXPERTS,
        "vocab_size": MAX_VOCAB,
    }
    values = {}
    for field, bound in fields.items():
        key = f"{arch}.{field}"
        required = field in ("block_count", "embedding_length")
        values[field] = check_header_value(where, key, _gguf_value(reader, key), bound, required=required)
    tokens = reader.fields.get("tokenizer.ggml.tokens")  # type: ignore[attr-defined]
    if tokens is not None:
        check_header_value(where, "tokenizer.ggml.tokens (count)", len(tokens.data), MAX_VOCAB)
    blocks = set()
    for tensor in reader.tensors:  # type: ignore[attr-defined]
        name = str(tensor.name)
        if name.startswith("blk."):
            index = name.split(".")[1]
            blocks.add(int(index) if index.isdigit() else -1)
    want = set(range(values["block_count"]))
    if blocks != want:
        extra = sorted(blocks - want)
        raise MoedgeError(
            f"{where}: {arch}.block_count is {values['block_count']}, but the file holds tensors for "
            f"{len(blocks & want)} of those blocks"
            + (f" and for block {extra[0]} beyond them" if extra else "")
            + ": the header or the weights are damaged"
        )
