"""Sparse upcycling: the ``smollm2-135m-moe`` test bed, a Mixtral made from a dense Llama.

Every FFN is copied into E experts whose weights are multiplied elementwise by (1 + sigma * N(0, 1))
(seeded), and each layer gets a bias-free router whose rows are the unit centroids of a seeded spherical
k-means over that layer's FFN inputs on build text. Routing is Mixtral's: softmax, top-k, renormalize.
With sigma = 0 every expert equals the dense FFN, so the model equals the dense one for any k.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from moedge._errors import MoedgeError
from moedge.model import LoadedModel

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, MixtralForCausalLM

log = logging.getLogger(__name__)

MOE_TESTBED = "smollm2-135m-moe"


@dataclass(frozen=True, kw_only=True)
class UpcycleConfig:
    """How to upcycle: experts, routing, expert noise, and the build text windows."""

    num_experts: int = 8
    top_k: int = 2
    sigma: float = 0.05
    seed: int = 0
    build_windows: int = 64
    window_len: int = 512
    kmeans_iters: int = 25

    def key(self) -> str:
        """A short stable hash naming the cached build."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_text_windows(loaded: LoadedModel, config: UpcycleConfig) -> tuple[np.ndarray, str]:
    """Token windows of the build text: C4 documents 0-999, or the shipped demo text without data."""
    from moedge.datasets import C4_BUILD_DOCS, c4_documents, demo_text, sample_windows
    from moedge.paths import data_dir

    if data_dir() is not None:
        lo, hi = C4_BUILD_DOCS
        text = "\n\n".join(c4_documents(lo, hi))
        origin = f"C4 sample documents {lo}-{hi - 1}"
    else:
        text = demo_text().text
        origin = "moedge shipped demo text (no data folder configured)"
        log.warning("no data folder configured: building the router from the shipped demo text")
    ids = np.asarray(loaded.encode(text), dtype=np.int64)
    window_len = min(config.window_len, len(ids) - 1)
    picked = sample_windows(ids, config.build_windows, window_len, seed=config.seed)
    return picked, f"{origin}, {len(picked)} windows of {window_len} tokens (seed {config.seed})"


def collect_ffn_inputs(model: LlamaForCausalLM, windows: np.ndarray) -> list[torch.Tensor]:
    """Inputs of every layer's FFN over ``windows`` (tokens x hidden per layer)."""
    import torch

    layers = model.model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for row in tqdm(windows, desc="collect FFN inputs", unit="window"):
                model(input_ids=torch.from_numpy(row)[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(chunks) for chunks in captured]


def spherical_kmeans(x: torch.Tensor, k: int, *, iters: int, seed: int) -> torch.Tensor:
    """Unit-length centroids (k x d) of a seeded spherical k-means (cosine similarity, k-means++ init)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    first = int(torch.randint(len(unit), (1,), generator=gen))
    centroids = [unit[first]]
    for _ in range(1, k):
        sim = unit @ torch.stack(centroids).T
        dist = (1.0 - sim.max(dim=1).values).clamp_min(0)
        probs = dist / dist.sum() if float(dist.sum()) > 0 else torch.full_like(dist, 1 / len(dist))
        centroids.append(unit[int(torch.multinomial(probs, 1, generator=gen))])
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = (unit @ c.T).argmax(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, unit)
        counts = torch.bincount(assign, minlength=k)
        for empty in torch.nonzero(counts == 0).flatten().tolist():  # reseed at the worst-served point
            worst = int((unit @ c.T).max(dim=1).values.argmin())
            sums[empty] = unit[worst]
        new = torch.nn.functional.normalize(sums, dim=-1)
        if torch.allclose(new, c, atol=1e-9):
            break
        c = new
    return c.float()


def upcycle(
    dense: LlamaForCausalLM, ffn_inputs: list[torch.Tensor], config: UpcycleConfig
) -> MixtralForCausalLM:
    """Turn a dense Llama into a Mixtral by copying each FFN into noised experts with a k-means router."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    dc = dense.config
    if dc.model_type not in ("llama", "mistral"):
        raise MoedgeError(f"upcycling needs a Llama/Mistral model, got {dc.model_type}")
    moe_config = MixtralConfig(
        vocab_size=dc.vocab_size,
        hidden_size=dc.hidden_size,
        intermediate_size=dc.intermediate_size,
        num_hidden_layers=dc.num_hidden_layers,
        num_attention_heads=dc.num_attention_heads,
        num_key_value_heads=dc.num_key_value_heads or dc.num_attention_heads,
        head_dim=getattr(dc, "head_dim", None) or dc.hidden_size // dc.num_attention_heads,
        hidden_act=dc.hidden_act,
        max_position_embeddings=dc.max_position_embeddings,
        rms_norm_eps=dc.rms_norm_eps,
        rope_parameters=dict(dc.rope_parameters or {}),
        tie_word_embeddings=dc.tie_word_embeddings,
        bos_token_id=dc.bos_token_id,
        eos_token_id=dc.eos_token_id,
        pad_token_id=getattr(dc, "pad_token_id", None),
        sliding_window=None,
        num_local_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    with torch.device("meta"):
        moe = MixtralForCausalLM(moe_config)
    dense_state = dense.state_dict()
    state: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(config.seed)

    def noised(w: torch.Tensor) -> torch.Tensor:
        if config.sigma == 0:
            return w.clone()
        return w * (1.0 + config.sigma * torch.randn(w.shape, generator=gen))

    for name, tensor in dense_state.items():
        if ".mlp." not in name:
            state[name] = tensor.clone()
    for i in range(dc.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (dense_state[p + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
        gate_up, downs = [], []
        for _ in range(config.num_experts):
            gate_up.append(torch.cat([noised(gate), noised(up)], dim=0))
            downs.append(noised(down))
        state[p + "experts.gate_up_proj"] = torch.stack(gate_up)
        state[p + "experts.down_proj"] = torch.stack(downs)
        state[p + "gate.weight"] = spherical_kmeans(
            ffn_inputs[i], config.num_experts, iters=config.kmeans_iters, seed=config.seed + i
        )
    moe.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, t in moe.state_dict().items() if t.is_meta and n != "lm_head.weight"]
    if missing:
        raise AssertionError(f"upcycle left parameters unset: {missing[:5]}")
    if dc.tie_word_embeddings:
        moe.tie_weights()
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: build them for real.
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config=moe_config)
    return moe.eval()


def upcycle_loaded(dense: LoadedModel, config: UpcycleConfig) -> LoadedModel:
    """Upcycle a loaded dense model on its build text; the result records how it was built."""
    windows, origin = build_text_windows(dense, config)
    inputs = collect_ffn_inputs(dense.model, windows)  # type: ignore[arg-type]
    moe = upcycle(dense.model, inputs, config)  # type: ignore[arg-type]
    provenance: dict[str, Any] = {
        "testbed": MOE_TESTBED if dense.name == "smollm2-135m" else f"{dense.name}-moe",
        "upcycled_from": dense.source,
        "build_text": origin,
        "upcycle": asdict(config),
    }
    return LoadedModel(
        model=moe,
        tokenizer=dense.tokenizer,
        name=provenance["testbed"],
        source=f"upcycled from {dense.name}",
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        provenance=provenance,
    )
