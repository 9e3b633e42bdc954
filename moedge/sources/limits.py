"""Sane bounds on what a model file's header may claim, checked before anything is allocated.

Every supported model is far inside them; a header beyond them is damaged or hostile.
"""

from __future__ import annotations

from moedge._errors import MoedgeError

MAX_LAYERS = 1024
MAX_DIM = 65536 * 4  # hidden and intermediate sizes
MAX_VOCAB = 2**22
MAX_HEADS = 4096
MAX_EXPERTS = 4096
MAX_CONTEXT = 2**20
_BOUNDS = {
    "num_hidden_layers": MAX_LAYERS,
    "hidden_size": MAX_DIM,
    "intermediate_size": MAX_DIM,
    "moe_intermediate_size": MAX_DIM,
    "shared_expert_intermediate_size": MAX_DIM,
    "ffn_dim": MAX_DIM,
    "word_embed_proj_dim": MAX_DIM,
    "vocab_size": MAX_VOCAB,
    "num_attention_heads": MAX_HEADS,
    "num_key_value_heads": MAX_HEADS,
    "num_experts": MAX_EXPERTS,
    "num_local_experts": MAX_EXPERTS,
    "num_experts_per_tok": MAX_EXPERTS,
    "max_position_embeddings": MAX_CONTEXT,
}


def check_header_value(where: str, field: str, value: object, bound: int, *, required: bool = False) -> int:
    """``value`` as an int when it is a whole number in ``1..bound``; else one line naming file, field and bound."""
    if value is None and not required:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= bound:
        raise MoedgeError(
            f"{where}: {field} is {value!r}, outside the sane range 1..{bound:,}: the file is damaged or "
            "not a model moedge can load"
        )
    return value


def check_hf_config(config: dict[str, object], where: str, *, weight_bytes: int | None = None) -> None:
    """Bound a Hugging Face config's sizes (``_BOUNDS``) and, given the weight files' bytes, check they can
    hold the weights the config implies (at half a byte per weight, the smallest any format stores)."""
    values = {
        field: 0
        if "experts" in field and config.get(field) == 0
        else check_header_value(where, field, config.get(field), bound)
        for field, bound in _BOUNDS.items()
    }  # an expert count of 0 is how some dense configs say "no experts"
    for field in ("num_hidden_layers", "hidden_size", "vocab_size"):
        check_header_value(where, field, config.get(field), _BOUNDS[field], required=True)
    if weight_bytes is None:
        return
    hidden, layers, vocab = values["hidden_size"], values["num_hidden_layers"], values["vocab_size"]
    experts = values["num_local_experts"] or values["num_experts"]
    if experts:
        per_layer_mlp = (
            experts * 2 * hidden * (values["moe_intermediate_size"] or values["intermediate_size"])
        )
    else:
        per_layer_mlp = 2 * hidden * (values["intermediate_size"] or values["ffn_dim"])
    weights = vocab * hidden + layers * (2 * hidden * hidden + per_layer_mlp)
    if weight_bytes < weights // 2:
        raise MoedgeError(
            f"{where}: the config implies at least {weights:,} weights ({layers} layers of hidden size "
            f"{hidden}, vocab {vocab:,}), but the weight files hold only {weight_bytes:,} bytes: the config "
            "or the weights are damaged"
        )
