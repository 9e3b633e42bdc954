"""Read a llama2.c checkpoint (legacy ``.bin``) into a Hugging Face Llama."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moedge._errors import MoedgeError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

_HEADER = struct.Struct("<7i")


def _permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama2.c rotates adjacent pairs; Hugging Face rotates halves: reorder q/k rows per head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def load_llama2c(path: str | Path) -> LlamaForCausalLM:
    """Convert a llama2.c legacy checkpoint into an FP32 ``LlamaForCausalLM`` in eval mode."""
    from moedge.loading import MAX_CONTEXT, MAX_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, check_header_value

    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(_HEADER.size)
    except OSError as exc:
        raise MoedgeError(f"cannot read llama2.c checkpoint {path}: {exc.strerror or exc}") from None
    if len(header) < _HEADER.size:
        raise MoedgeError(f"{path} is not a llama2.c checkpoint: file too short for its header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack_from(header)
    shared = vocab > 0
    vocab = abs(vocab)
    where = f"llama2.c checkpoint {path}"
    for field, value, bound in (
        ("dim", dim, MAX_DIM),
        ("hidden_dim", hidden, MAX_DIM),
        ("n_layers", n_layers, MAX_LAYERS),
        ("n_heads", n_heads, MAX_HEADS),
        ("n_kv_heads", n_kv, MAX_HEADS),
        ("vocab_size", vocab, MAX_VOCAB),
        ("seq_len", seq_len, MAX_CONTEXT),
    ):
        check_header_value(where, f"header field {field}", value, bound, required=True)
    if dim % n_heads or n_heads % n_kv:
        raise MoedgeError(
            f"{path} is not a llama2.c checkpoint: implausible header {_HEADER.unpack_from(header)} "
            "(dim must split into n_heads heads, n_heads into n_kv_heads groups)"
        )
    head = dim // n_heads
    kv_dim = n_kv * head
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("embed", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_real", (seq_len, head // 2)),
        ("freq_imag", (seq_len, head // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    expected = _HEADER.size + 4 * sum(math.prod(s) for _, s in shapes)  # Python ints: no overflow
    if size != expected:
        raise MoedgeError(f"{path} is corrupt or truncated: {size} bytes, the header implies {expected}")
    if (dim // n_heads) % 2:
        raise MoedgeError(f"{path}: head size {dim // n_heads} is odd; rotary embeddings need an even one")
    raw = path.read_bytes()
    if len(raw) != expected:
        raise MoedgeError(f"{path} changed while being read: {len(raw)} bytes, the header implies {expected}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tensors: dict[str, np.ndarray] = {}
    offset = _HEADER.size
    for name, shape in shapes:
        count = int(np.prod(shape))
        tensors[name] = np.frombuffer(raw, dtype="<f4", count=count, offset=offset).reshape(shape)
        offset += 4 * count

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=shared,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    state: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": tensors["embed"],
        "model.norm.weight": tensors["rms_final"],
        "lm_head.weight": tensors["embed"] if shared else tensors["wcls"],
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = tensors["rms_att"][i]
        state[p + "post_attention_layernorm.weight"] = tensors["rms_ffn"][i]
        state[p + "self_attn.q_proj.weight"] = _permute_rotary(tensors["wq"][i], n_heads)
        state[p + "self_attn.k_proj.weight"] = _permute_rotary(tensors["wk"][i], n_kv)
        state[p + "self_attn.v_proj.weight"] = tensors["wv"][i]
        state[p + "self_attn.o_proj.weight"] = tensors["wo"][i]
        state[p + "mlp.gate_proj.weight"] = tensors["w1"][i]
        state[p + "mlp.down_proj.weight"] = tensors["w2"][i]
        state[p + "mlp.up_proj.weight"] = tensors["w3"][i]
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    if shared:
        model.tie_weights()
    return model.eval()
