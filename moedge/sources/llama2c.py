"""llama2.c sources: a legacy ``.bin`` checkpoint read into a Hugging Face Llama, and its tokenizer."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moedge._errors import MoedgeError
from moedge.model import LoadedModel
from moedge.sources.limits import MAX_CONTEXT, MAX_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, check_header_value

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

_HEADER = struct.Struct("<7i")


@dataclass(frozen=True)
class _Header:
    """The seven header ints; a negative vocab size means an untied classifier follows the weights."""

    dim: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv: int
    vocab: int
    seq_len: int
    shared: bool

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of the file, in file order."""
        dim, hidden, layers, head = self.dim, self.hidden, self.n_layers, self.dim // self.n_heads
        kv_dim = self.n_kv * head
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("embed", (self.vocab, dim)),
            ("rms_att", (layers, dim)),
            ("wq", (layers, dim, dim)),
            ("wk", (layers, kv_dim, dim)),
            ("wv", (layers, kv_dim, dim)),
            ("wo", (layers, dim, dim)),
            ("rms_ffn", (layers, dim)),
            ("w1", (layers, hidden, dim)),
            ("w2", (layers, dim, hidden)),
            ("w3", (layers, hidden, dim)),
            ("rms_final", (dim,)),
            ("freq_real", (self.seq_len, head // 2)),
            ("freq_imag", (self.seq_len, head // 2)),
        ]
        if not self.shared:
            shapes.append(("wcls", (self.vocab, dim)))
        return shapes

    def file_size(self) -> int:
        """The bytes a file with this header holds (Python ints: no overflow)."""
        return _HEADER.size + 4 * sum(math.prod(s) for _, s in self.shapes())


def _permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama2.c rotates adjacent pairs; Hugging Face rotates halves: reorder q/k rows per head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _read_header(path: Path) -> tuple[_Header, int]:
    """The checked header and the file's size, before anything is allocated."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(_HEADER.size)
    except OSError as exc:
        raise MoedgeError(f"cannot read llama2.c checkpoint {path}: {exc.strerror or exc}") from None
    if len(header) < _HEADER.size:
        raise MoedgeError(f"{path} is not a llama2.c checkpoint: file too short for its header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack_from(header)
    where = f"llama2.c checkpoint {path}"
    for field, value, bound in (
        ("dim", dim, MAX_DIM),
        ("hidden_dim", hidden, MAX_DIM),
        ("n_layers", n_layers, MAX_LAYERS),
        ("n_heads", n_heads, MAX_HEADS),
        ("n_kv_heads", n_kv, MAX_HEADS),
        ("vocab_size", abs(vocab), MAX_VOCAB),
        ("seq_len", seq_len, MAX_CONTEXT),
    ):
        check_header_value(where, f"header field {field}", value, bound, required=True)
    if dim % n_heads or n_heads % n_kv:
        raise MoedgeError(
            f"{path} is not a llama2.c checkpoint: implausible header {_HEADER.unpack_from(header)} "
            "(dim must split into n_heads heads, n_heads into n_kv_heads groups)"
        )
    return _Header(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, shared=vocab > 0), size


def _read_tensors(path: Path, head: _Header, size: int) -> dict[str, np.ndarray]:
    """Every tensor of the file as float32 arrays, after checking the size matches the header."""
    expected = head.file_size()
    if size != expected:
        raise MoedgeError(f"{path} is corrupt or truncated: {size} bytes, the header implies {expected}")
    if (head.dim // head.n_heads) % 2:
        raise MoedgeError(
            f"{path}: head size {head.dim // head.n_heads} is odd; rotary embeddings need an even one"
        )
    raw = path.read_bytes()
    if len(raw) != expected:
        raise MoedgeError(f"{path} changed while being read: {len(raw)} bytes, the header implies {expected}")
    tensors: dict[str, np.ndarray] = {}
    offset = _HEADER.size
    for name, shape in head.shapes():
        count = int(np.prod(shape))
        tensors[name] = np.frombuffer(raw, dtype="<f4", count=count, offset=offset).reshape(shape)
        offset += 4 * count
    return tensors


def _state_dict(head: _Header, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors under Hugging Face Llama names, q/k rows permuted to HF's rotary layout."""
    state: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": tensors["embed"],
        "model.norm.weight": tensors["rms_final"],
        "lm_head.weight": tensors["embed"] if head.shared else tensors["wcls"],
    }
    for i in range(head.n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = tensors["rms_att"][i]
        state[p + "post_attention_layernorm.weight"] = tensors["rms_ffn"][i]
        state[p + "self_attn.q_proj.weight"] = _permute_rotary(tensors["wq"][i], head.n_heads)
        state[p + "self_attn.k_proj.weight"] = _permute_rotary(tensors["wk"][i], head.n_kv)
        state[p + "self_attn.v_proj.weight"] = tensors["wv"][i]
        state[p + "self_attn.o_proj.weight"] = tensors["wo"][i]
        state[p + "mlp.gate_proj.weight"] = tensors["w1"][i]
        state[p + "mlp.down_proj.weight"] = tensors["w2"][i]
        state[p + "mlp.up_proj.weight"] = tensors["w3"][i]
    return state


def load_llama2c(path: str | Path) -> LlamaForCausalLM:
    """Convert a llama2.c legacy checkpoint into an FP32 ``LlamaForCausalLM`` in eval mode."""
    path = Path(path)
    head, size = _read_header(path)
    tensors = _read_tensors(path, head, size)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=head.vocab,
        hidden_size=head.dim,
        intermediate_size=head.hidden,
        num_hidden_layers=head.n_layers,
        num_attention_heads=head.n_heads,
        num_key_value_heads=head.n_kv,
        max_position_embeddings=head.seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=head.shared,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    state = _state_dict(head, tensors)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    if head.shared:
        model.tie_weights()
    return model.eval()


def load_llama2c_checkpoint(path: Path) -> LoadedModel:
    """Load a llama2.c ``.bin`` with the ``tok512.model`` (or ``tokenizer.model``) beside it."""
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
