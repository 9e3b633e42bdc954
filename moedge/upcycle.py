"""Sparse upcycling: the ``smollm2-135m-moe`` test bed, a Mixtral made from a dense Llama.

Every FFN is copied into E experts whose weights are multiplied elementwise by (1 + sigma * N(0, 1))
(seeded), and each layer gets a bias-free router whose rows are the unit centroids of a seeded spherical
k-means over that layer's FFN inputs on build text. Routing is Mixtral's: softmax, top-k, renormalize.
With sigma = 0 every expert equals the dense FFN, so the model equals the dense one for any k.

The default test bed's centroids (float32, computed from the C4 sample of the data folder) ship in
``moedge/data/router_centroids_smollm2-135m-moe.npz`` with a provenance JSON beside it, so the test bed
is the same model with or without a data folder. Regenerate them (the data folder is required)::

    MOEDGE_DATA=/path/to/shared/data python -m moedge.router_centroids --write-centroids
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
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
SHIPPED_DIR = Path(__file__).resolve().parent / "data"
CENTROIDS_FILE = f"router_centroids_{MOE_TESTBED}.npz"  # array "centroids": layers x experts x hidden
CENTROIDS_PROVENANCE = f"router_centroids_{MOE_TESTBED}.json"
REGENERATE = "MOEDGE_DATA=/path/to/shared/data python -m moedge.router_centroids --write-centroids"


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
                # the decoder only: the FFN inputs do not need the LM head's logits
                model.model(input_ids=torch.from_numpy(row)[None], use_cache=False)
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


def kmeans_centroids(ffn_inputs: list[torch.Tensor], config: UpcycleConfig) -> np.ndarray:
    """Every layer's router rows (layers x experts x hidden, float32): seeded spherical k-means of its FFN
    inputs, layer ``i`` seeded with ``config.seed + i``."""
    return np.stack(
        [
            spherical_kmeans(x, config.num_experts, iters=config.kmeans_iters, seed=config.seed + i).numpy()
            for i, x in enumerate(tqdm(ffn_inputs, desc="k-means routers", unit="layer"))
        ]
    ).astype(np.float32)


def upcycle(dense: LlamaForCausalLM, centroids: np.ndarray, config: UpcycleConfig) -> MixtralForCausalLM:
    """Turn a dense Llama into a Mixtral by copying each FFN into noised experts; layer ``i``'s router
    weight is ``centroids[i]`` (experts x hidden)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    dc = dense.config
    if dc.model_type not in ("llama", "mistral"):
        raise MoedgeError(f"upcycling needs a Llama/Mistral model, got {dc.model_type}")
    want = (dc.num_hidden_layers, config.num_experts, dc.hidden_size)
    if tuple(centroids.shape) != want:
        raise MoedgeError(f"router centroids have shape {tuple(centroids.shape)}, the model needs {want}")
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
        state[p + "gate.weight"] = torch.from_numpy(np.array(centroids[i], dtype=np.float32))
    moe.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, t in moe.state_dict().items() if t.is_meta and n != "lm_head.weight"]
    if missing:
        raise AssertionError(f"upcycle left parameters unset: {missing[:5]}")
    if dc.tie_word_embeddings:
        moe.tie_weights()
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: build them for real.
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config=moe_config)
    return moe.eval()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def compute_router_centroids(
    dense: LoadedModel, config: UpcycleConfig, *, layers: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The router centroids the builder computes from the build text, and how (text, window hashes).

    ``layers`` computes only the first ``layers`` layers' (their FFN inputs need only those layers, so
    a check of the first layers costs a fraction of the whole).
    """
    import torch

    windows, origin = build_text_windows(dense, config)
    model = dense.model
    blocks = model.model.layers  # type: ignore[union-attr]
    if layers is not None:
        if not 1 <= layers <= len(blocks):
            raise MoedgeError(f"layers must be in 1-{len(blocks)}, got {layers}")
        model.model.layers = torch.nn.ModuleList(list(blocks)[:layers])  # type: ignore[union-attr]
    try:
        inputs = collect_ffn_inputs(model, windows)  # type: ignore[arg-type]
    finally:
        model.model.layers = blocks  # type: ignore[union-attr]
    info = {
        "build_text": origin,
        "windows_shape": list(windows.shape),
        "windows_sha256": _sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()),
    }
    return kmeans_centroids(inputs, config), info


@dataclass(frozen=True)
class ShippedCentroids:
    """Router centroids shipped in ``moedge/data`` and the provenance JSON that says how they were made."""

    centroids: np.ndarray
    provenance: dict[str, Any]
    path: Path

    def matches_base(self, base_file: Path) -> bool:
        """Whether ``base_file`` (the dense model's weights file) is the one the centroids were computed on."""
        return bool(file_sha256(base_file) == self.provenance["base_weights"]["sha256"])


def load_shipped_centroids(config: UpcycleConfig, folder: Path = SHIPPED_DIR) -> ShippedCentroids | None:
    """The shipped centroids when they were computed with ``config``, else None; a file that does not
    match its provenance's hash is an error."""
    path, meta = folder / CENTROIDS_FILE, folder / CENTROIDS_PROVENANCE
    if not (path.is_file() and meta.is_file()):
        return None
    provenance = json.loads(meta.read_text())
    if provenance.get("upcycle") != asdict(config):
        return None
    with np.load(path) as npz:
        centroids = np.ascontiguousarray(npz["centroids"], dtype=np.float32)
    if _sha256(centroids.tobytes()) != provenance.get("centroids_sha256"):
        raise MoedgeError(
            f"{path} does not match the sha256 in {meta.name}: reinstall moedge or regenerate ({REGENERATE})"
        )
    return ShippedCentroids(centroids=centroids, provenance=provenance, path=path)


def upcycle_loaded(
    dense: LoadedModel, config: UpcycleConfig, *, centroids: ShippedCentroids | None = None
) -> LoadedModel:
    """Upcycle a loaded dense model; the result records how it was built.

    The routers are ``centroids`` when given (the shipped ones: no build text is read), else computed
    from the build text (:func:`compute_router_centroids`).
    """
    if centroids is not None:
        rows = centroids.centroids
        origin = (
            f"shipped router centroids moedge/data/{centroids.path.name} "
            f"(sha256 {centroids.provenance['centroids_sha256'][:12]}), computed from "
            f"{centroids.provenance['build_text']}"
        )
    else:
        rows, info = compute_router_centroids(dense, config)
        origin = info["build_text"]
    moe = upcycle(dense.model, rows, config)  # type: ignore[arg-type]
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
