"""Calibration token sequences by the BENCHMARKS.md protocol (calibrate on text other than the eval text)."""

from __future__ import annotations

import os

import numpy as np

from moedge._errors import MoedgeError
from moedge.model import LoadedModel

CALIB_DATASETS = ("c4", "wikitext2", "ptb", "demo", "stories")


def calibration_windows(
    loaded: LoadedModel,
    *,
    dataset: str = "c4",
    count: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """``count`` windows of ``seqlen`` tokens drawn with ``seed`` (C4: sample documents 0-999 only).

    A file path as ``dataset`` reads that text file.
    """
    from moedge.datasets import C4_BUILD_DOCS, c4_documents, load_text, sample_windows

    if count < 1:
        raise MoedgeError(f"--calib-windows must be at least 1 (got {count})")
    if dataset == "c4":
        text = "\n\n".join(c4_documents(*C4_BUILD_DOCS, data_dir=data_dir))
    else:
        text = load_text(dataset, data_dir=data_dir).text
    ids = np.asarray(loaded.encode(text), dtype=np.int64)
    if len(ids) <= seqlen:
        raise MoedgeError(
            f"the calibration text has {len(ids)} tokens, not more than one window of {seqlen}: "
            "give a longer text or a smaller --seqlen"
        )
    return sample_windows(ids, count, seqlen, seed=seed)


def sample_stories(
    loaded: LoadedModel, *, count: int, max_tokens: int = 256, seed: int = 0
) -> list[np.ndarray]:
    """``count`` sequences sampled from the model itself (temperature 1.0, from BOS, up to ``max_tokens``).

    The calibration set for a model with no other text in its domain (stories260K); a different seed
    gives the evaluation set.
    """
    import torch

    if loaded.bos_token_id is None:
        raise MoedgeError(f"{loaded.name} has no BOS token to start sampling from")
    gen = torch.Generator().manual_seed(seed)
    model = loaded.model
    out: list[np.ndarray] = []
    with torch.no_grad():
        for _ in range(count):
            ids = [loaded.bos_token_id]
            past = None
            step = torch.tensor([ids])
            for _ in range(max_tokens - 1):
                res = model(input_ids=step, cache=past, use_cache=True)
                past = res.cache
                probs = torch.softmax(res.logits[0, -1].float(), dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
                ids.append(nxt)
                if nxt == loaded.eos_token_id:
                    break
                step = torch.tensor([[nxt]])
            out.append(np.asarray(ids, dtype=np.int64))
    return out
