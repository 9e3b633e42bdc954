"""Which module names count as routed experts (the export <-> split-pass contract)."""

from __future__ import annotations

from moedge.formats.graph_names import expert_of, experts_per_layer


def test_expert_of_reads_layer_and_expert():
    assert expert_of("model.layers.3.mlp.experts.5") == (3, 5)
    assert expert_of("model.layers.12.mlp.experts.0.down_proj") == (12, 0)
    assert expert_of("model.layers.3.mlp.experts") is None  # the container, not an expert
    assert expert_of("model.layers.3.mlp.shared_expert.gate_proj") is None
    assert expert_of("model.layers.3.mlp.gate") is None


def test_experts_per_layer_counts_distinct_experts():
    names = [
        "model.layers.0.mlp.experts.1.up_proj",
        "model.layers.0.mlp.experts.1",
        "model.layers.1.mlp.experts.2",
    ]
    assert experts_per_layer(names) == {0: 1, 1: 1}
