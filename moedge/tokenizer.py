"""Tokenizers that travel with a model as ``tokenizer.json`` (the `tokenizers` library format)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from moedge._errors import MoedgeError


def byte_level_tokenizer() -> Tokenizer:
    """A 258-token byte-level tokenizer (256 bytes, ``<s>``, ``</s>``) for the random-weight test beds."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"] = len(vocab)
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def sentencepiece_bpe_tokenizer(model_file: str | Path) -> Tokenizer:
    """Convert a SentencePiece BPE model (e.g. llama2.c's ``tok512.model``) into a `tokenizers` BPE.

    Merges are derived from the piece scores as SentencePiece ranks them; encodes and decodes match
    the ``sentencepiece`` package (checked in the tests).
    """
    try:
        import sentencepiece as spm
    except ImportError as exc:  # pragma: no cover - import guard
        raise MoedgeError("sentencepiece is missing: pip install 'moedge[export]'") from exc
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as exc:
        raise MoedgeError(f"cannot read SentencePiece model {model_file}: {exc}") from None
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-sp.get_score(pid), pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # SentencePiece's default normalizer drops extra whitespace; then spaces become the meta symbol.
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Strip(),
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Prepend("▁"),
            normalizers.Replace(" ", "▁"),
        ]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [sp.id_to_piece(i) for i in (sp.bos_id(), sp.eos_id()) if i >= 0]
    tok.add_special_tokens(specials)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``, with a clear error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise MoedgeError(f"tokenizer file {path} is missing: re-export the model (moedge export)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise MoedgeError(f"tokenizer file {path} is corrupt ({exc}): re-export the model") from None
