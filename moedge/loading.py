"""``load_model``: one entry point for every model source moedge accepts."""

from __future__ import annotations

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


# Sane bounds on what a model header may claim, checked before anything is allocated: every supported
# model is far inside them, and a header beyond them is damaged or hostile.
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
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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
        if path.is_dir():
            return load_hf_folder(path)
        from moedge.inputs import check_input_file

        check_input_file(path, "model file", limit=2**62)  # a regular file, never a FIFO or a device
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
        hf_tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
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
    _check_architecture(model_type if isinstance(model_type, str) else None, str(config_file))
    _warn_auto_map(path, {"config.json": config, "tokenizer_config.json": tok_config}, str(model_type))
    for entry in path.iterdir():  # transformers opens what it finds: a FIFO or a device would block it
        if entry.exists() and not (entry.is_file() or entry.is_dir()):
            raise MoedgeError(f"{entry} in the model folder is not a regular file (a device, FIFO or socket)")
    weight_files = [f for f in path.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file()]
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
        hf_tok, backend = _tokenizer_from_transformers(str(path))
    loaded = _finish(model, hf_tok, backend, name=path.name, source=str(path))
    build_info = path / "moedge_build.json"
    if build_info.exists():
        loaded.provenance.update(_read_json_file(build_info, "build record"))
    return loaded


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
    _check_architecture(arch, str(path))
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
    hf_tok, backend = _tokenizer_from_transformers(str(path.parent), gguf_file=path.name)
    return _finish(model, hf_tok, backend, name=path.stem, source=str(path))


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
        config = AutoConfig.from_pretrained(repo_id, trust_remote_code=False)
    except Exception as exc:
        raise MoedgeError(
            f"unknown model '{repo_id}': not a test bed or local path, and the hub did not answer "
            f"({type(exc).__name__}). Give {_sources_help()}"
        ) from None
    _check_architecture(getattr(config, "model_type", None), repo_id)
    _warn_auto_map(Path(repo_id), {"config.json": config.to_dict()}, str(config.model_type))
    check_hf_config(config.to_dict(), repo_id)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32, trust_remote_code=False)
    hf_tok, backend = _tokenizer_from_transformers(repo_id)
    return _finish(model, hf_tok, backend, name=repo_id.split("/")[-1], source=repo_id)
