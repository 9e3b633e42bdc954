"""The router centroids shipped for smollm2-135m-moe: what their provenance says, what the builder computes
from the data folder, and what the test bed uses with or without a data folder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pytest

from moedge.paths import cache_dir
from moedge.testbeds import shipped_router_centroids, smollm2_gguf_path
from moedge.upcycle import (
    CENTROIDS_FILE,
    CENTROIDS_PROVENANCE,
    MOE_TESTBED,
    SHIPPED_DIR,
    UpcycleConfig,
    compute_router_centroids,
    load_shipped_centroids,
)

CHECKED_LAYERS = 1  # the first layers' FFN inputs need only those layers: seconds, not minutes


def test_shipped_centroids_match_their_provenance():
    path, meta = SHIPPED_DIR / CENTROIDS_FILE, SHIPPED_DIR / CENTROIDS_PROVENANCE
    provenance = json.loads(meta.read_text())
    assert path.stat().st_size < 1_000_000
    assert provenance["upcycle"] == asdict(UpcycleConfig())
    assert (
        provenance["base_weights"]["sha256"] == hashlib.sha256(smollm2_gguf_path().read_bytes()).hexdigest()
    )
    assert "python -m moedge.router_centroids --write-centroids" in provenance["command"]
    with np.load(path) as npz:
        centroids = npz["centroids"]
    assert centroids.dtype == np.float32 and list(centroids.shape) == provenance["shape"] == [30, 8, 576]
    assert hashlib.sha256(centroids.tobytes()).hexdigest() == provenance["centroids_sha256"]
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=-1), 1.0, atol=1e-5)  # unit rows


def test_other_configs_do_not_get_the_shipped_centroids():
    assert load_shipped_centroids(UpcycleConfig(num_experts=4)) is None
    assert load_shipped_centroids(UpcycleConfig(seed=1)) is None


def test_the_test_bed_uses_the_shipped_centroids_without_a_data_folder(monkeypatch):
    monkeypatch.delenv("MOEDGE_DATA", raising=False)
    shipped = shipped_router_centroids(UpcycleConfig())
    assert shipped is not None and shipped.path == SHIPPED_DIR / CENTROIDS_FILE
    monkeypatch.setenv("MOEDGE_DATA", str(SHIPPED_DIR))  # any folder: the shipped ones still win
    again = shipped_router_centroids(UpcycleConfig())
    assert again is not None and np.array_equal(again.centroids, shipped.centroids)


def test_a_cached_test_bed_has_the_shipped_routers():
    # the cache key is UpcycleConfig().key(): a test bed built before the centroids shipped must be the
    # same model as one built from them
    folder = cache_dir() / f"{MOE_TESTBED}-{UpcycleConfig().key()}"
    weights = folder / "model.safetensors"
    if not weights.is_file():
        pytest.skip(f"no cached {MOE_TESTBED} at {folder}")
    from safetensors import safe_open

    shipped = load_shipped_centroids(UpcycleConfig())
    assert shipped is not None
    with safe_open(str(weights), "np") as f:
        names = {k.split(".")[2]: k for k in f.keys() if k.endswith(".gate.weight")}
        gates = np.stack([f.get_tensor(names[str(i)]) for i in range(len(names))])
    np.testing.assert_array_equal(gates, shipped.centroids)


@pytest.mark.slow
def test_shipped_centroids_are_what_the_builder_computes_from_the_data_folder(data_dir, smollm2):
    # the full check of all 30 layers: MOEDGE_DATA=... python -m moedge.router_centroids --check (minutes)
    shipped = load_shipped_centroids(UpcycleConfig())
    assert shipped is not None
    computed, info = compute_router_centroids(smollm2, UpcycleConfig(), layers=CHECKED_LAYERS)
    assert info["windows_sha256"] == shipped.provenance["build_windows"]["sha256_int64"]
    assert computed.shape == (CHECKED_LAYERS, 8, 576)
    np.testing.assert_array_equal(computed, shipped.centroids[:CHECKED_LAYERS])
