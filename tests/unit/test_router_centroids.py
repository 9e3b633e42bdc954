"""The router centroids shipped for smollm2-135m-moe: what their provenance says, what the builder computes
from the data folder, and what the test bed uses with or without a data folder."""

from __future__ import annotations

from moedge.upcycle import (
    UpcycleConfig,
    load_shipped_centroids,
)

CHECKED_LAYERS = 1  # the first layers' FFN inputs need only those layers: seconds, not minutes


def test_other_configs_do_not_get_the_shipped_centroids():
    assert load_shipped_centroids(UpcycleConfig(num_experts=4)) is None
    assert load_shipped_centroids(UpcycleConfig(seed=1)) is None
