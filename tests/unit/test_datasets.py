"""Evaluation text resolution and windowing."""

from __future__ import annotations

import numpy as np
import pytest

from moedge import MoedgeError
from moedge.datasets import c4_documents, load_text, sample_windows, windows
from moedge.evaluation import window_nll


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = np.arange(10)
    w = windows(ids, 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 4, max_windows=1).shape == (1, 4)
    with pytest.raises(MoedgeError, match="fewer than one window"):
        windows(ids, 11)


def test_sample_windows_are_seeded():
    ids = np.arange(1000)
    a = sample_windows(ids, 5, 16, seed=0)
    assert (a == sample_windows(ids, 5, 16, seed=0)).all()
    assert not (a == sample_windows(ids, 5, 16, seed=1)).all()
    assert (np.diff(a, axis=1) == 1).all()


def test_shared_data_resolves(data_dir):
    wiki = load_text("wikitext2", data_dir=data_dir)
    assert wiki.text.startswith(" = Robert Boulter = ")
    assert "ptb.test.txt" in load_text("ptb", data_dir=data_dir).origin
    c4 = load_text("c4", data_dir=data_dir)
    assert "documents 1000-1999" in c4.origin
    assert c4_documents(0, 3, data_dir=data_dir)[0] not in c4.text[:2000]


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(MoedgeError, match="dataset not found"):
        load_text("wikitext3")
    with pytest.raises(MoedgeError, match="dataset not found"):
        load_text("wikitext2", data_dir=tmp_path)
    with pytest.raises(MoedgeError, match="does not exist"):
        load_text("ptb", data_dir=tmp_path / "nope")


def test_window_nll_matches_a_direct_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7)).astype(np.float32) * 4
    ids = rng.integers(0, 7, 5)
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    expected = -sum(logp[i, ids[i + 1]] for i in range(4))
    assert window_nll(logits, ids) == pytest.approx(expected, rel=1e-9)
