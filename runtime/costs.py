"""What a bundle's graphs cost a device (bytes and weights per graph), and ``--gpu-budget`` in bytes."""

from __future__ import annotations

from dataclasses import dataclass

from moedge._errors import MoedgeError
from moedge.formats.manifest import MAX_FILE_BYTES, Manifest
from moedge.runtime.cache import ExpertKey


@dataclass(frozen=True)
class GraphCost:
    """What the cost model needs of one graph: bytes on the device and weight count."""

    bytes: int
    params: int


@dataclass
class ModelCosts:
    """Per-graph costs of a bundle (device bytes as stored)."""

    moe_layers: list[int]
    num_experts: int
    top_k: int
    experts: dict[ExpertKey, GraphCost]
    stages: dict[int, GraphCost]
    head: GraphCost
    embedding: GraphCost
    kv_bytes_per_token: int  # all layers, FP16 keys and values
    int8: bool
    num_params: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ModelCosts:
        """Costs read from a bundle manifest; a W8A8 bundle stores one byte per weight, FP32 four.

        MoE layers whose experts run inside their stage graph (``--experts-in-graph``) count as stages:
        they have no expert to place, so ``moe_layers`` and ``experts`` leave them out."""
        int8 = manifest.precision == "w8a8"
        per = 1 if int8 else 4

        def cost(nbytes: int) -> GraphCost:
            return GraphCost(bytes=nbytes, params=nbytes // per)

        experts = {
            (layer.index, e): cost(g.bytes)
            for layer in manifest.layers
            if layer.moe
            for e, g in enumerate(layer.moe.experts)
        }
        moe = [layer for layer in manifest.layers if layer.moe and not layer.moe.experts_in_graph]
        model = manifest.model
        kv = 2 * len(manifest.layers) * int(model["num_kv_heads"]) * int(model["head_dim"]) * 2
        # a stage spanning several dense layers is counted at its first layer
        stages = {layer.index: cost(layer.stage.bytes if layer.stage else 0) for layer in manifest.layers}
        # the embedding and lm_head stay FP32 in every bundle (a tied head stores nothing of its own)
        embedding = GraphCost(bytes=manifest.embedding.bytes, params=manifest.embedding.bytes // 4)
        head = GraphCost(bytes=manifest.head.bytes, params=manifest.head.bytes // 4)
        total = sum(c.params for c in experts.values()) + sum(c.params for c in stages.values())
        total += embedding.params + head.params
        return cls(
            moe_layers=[layer.index for layer in moe],
            num_experts=moe[0].moe.num_experts if moe and moe[0].moe else 0,
            top_k=moe[0].moe.gating.top_k if moe and moe[0].moe else 0,
            experts=experts,
            stages=stages,
            head=head,
            embedding=embedding,
            kv_bytes_per_token=kv,
            int8=int8,
            num_params=total,
        )

    def expert_bytes(self) -> int:
        """Bytes of every expert, as stored."""
        return sum(c.bytes for c in self.experts.values())

    def resident_base_bytes(self) -> int:
        """Bytes always on the GPU besides experts and KV: embedding, stages and head."""
        return self.embedding.bytes + sum(c.bytes for c in self.stages.values()) + self.head.bytes

    def fp16_footprint(self, context: int) -> int:
        """Bytes of the same model all on the GPU in FP16 (weights and a ``context``-token KV cache)."""
        return 2 * self.num_params + self.kv_bytes_per_token * context


def parse_budget(
    spec: str | int | float | None,
    costs: ModelCosts,
    *,
    free_device_bytes: int | None = None,
    context: int = 0,
) -> int:
    """Bytes for ``--gpu-budget``: ``1.5GiB``/``800MB``/bytes, ``25%`` or ``0.25`` of expert bytes, or ``auto``.

    ``auto`` is 90% of the device's free memory (measured after the stage graphs are loaded) less a
    ``context``-token KV cache, capped at every expert's bytes.
    """
    total = costs.expert_bytes()
    if spec is None:
        return total
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        value = float(spec)
        return int(value * total) if 0 <= value <= 1 else _saturate(value)
    text = str(spec).strip().lower()
    try:
        if text == "auto":
            if free_device_bytes is None:
                raise MoedgeError("--gpu-budget auto needs a device that reports free memory (a GPU backend)")
            # measured with the stage graphs already resident: leave the KV cache and a 10% margin
            room = free_device_bytes - costs.kv_bytes_per_token * context
            return max(0, min(total, int(room * 0.9)))
        if text.endswith("%"):
            return int(float(text[:-1]) / 100 * total)
        units = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}
        for unit, scale in units.items():
            if text.endswith(unit):
                return _saturate(float(text[: -len(unit)]) * scale)
        value = float(text)
    except ValueError:
        raise MoedgeError(
            f"cannot read GPU budget {spec!r}: give bytes (1.5GiB, 800MB), a share of expert bytes (25%) or auto"
        ) from None
    return int(value * total) if 0 <= value <= 1 else _saturate(value)


def _saturate(value: float) -> int:
    """Bytes as an int, at most ``MAX_FILE_BYTES`` (2^62, more than any bundle's experts), as the C++
    runner's int64 budgets are."""
    return int(min(value, MAX_FILE_BYTES))
