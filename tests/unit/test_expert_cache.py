"""The expert cache, placements, budgets, profiles and the scheduler on random traces (no graphs run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moedge._errors import MoedgeError
from moedge.formats.placement_plan import read_plan_file, write_plan
from moedge.formats.routing import RoutingRecorder, RoutingStats
from moedge.runtime.cache import ExpertCache
from moedge.runtime.costs import GraphCost, ModelCosts, parse_budget
from moedge.runtime.placement import plan_haq, plan_last_layers, plan_popularity
from moedge.runtime.policies import POLICIES
from moedge.runtime.profiles import BUILTIN, load_profile
from moedge.runtime.scheduler import ExpertScheduler
from moedge.runtime.simulate import DecodeTrace, replay

LAYERS, EXPERTS, TOP_K = 4, 8, 2


def _costs(sizes: dict[tuple[int, int], int] | None = None) -> ModelCosts:
    experts = {
        (li, e): GraphCost(1000 + 10 * e, 1000 + 10 * e) for li in range(LAYERS) for e in range(EXPERTS)
    }
    if sizes:
        experts = {k: GraphCost(v, v) for k, v in sizes.items()}
    return ModelCosts(
        moe_layers=list(range(LAYERS)),
        num_experts=EXPERTS,
        top_k=TOP_K,
        experts=experts,
        stages={li: GraphCost(500, 500) for li in range(LAYERS)},
        head=GraphCost(2000, 2000),
        embedding=GraphCost(2000, 2000),
        kv_bytes_per_token=64,
        int8=True,
        num_params=50_000,
    )


def _trace(rng: np.random.Generator, tokens: int, skew: float = 1.0) -> DecodeTrace:
    p = rng.dirichlet(np.full(EXPERTS, skew), size=LAYERS)
    chosen = np.stack(
        [
            np.stack([rng.choice(EXPERTS, TOP_K, replace=False, p=p[li]) for li in range(LAYERS)])
            for _ in range(tokens)
        ]
    )
    spec = np.stack([np.stack([rng.permutation(EXPERTS)[:4] for _ in range(LAYERS)]) for _ in range(tokens)])
    spec[:, 0] = -1
    return DecodeTrace(list(range(LAYERS)), chosen.astype(np.int16), spec.astype(np.int16), EXPERTS)


def test_cache_evicts_lru_and_never_pinned():
    sizes = {(0, e): 10 for e in range(4)}
    cache = ExpertCache(30, sizes, pinned=[(0, 0)], eviction="lru")
    assert cache.admit((0, 1), 0.0, now=0.0, protect=set())
    assert cache.admit((0, 2), 0.0, now=0.0, protect=set())
    cache.touch((0, 1))
    assert cache.admit((0, 3), 0.0, now=0.0, protect=set())  # evicts (0, 2), the least recent unpinned
    assert set(cache.ready) == {(0, 0), (0, 1), (0, 3)} and cache.used == 30
    with pytest.raises(MoedgeError, match="pinned"):
        cache.evict((0, 0))


def test_cache_counts_transfers_in_flight_against_the_budget():
    sizes = {(0, e): 10 for e in range(3)}
    cache = ExpertCache(20, sizes, eviction="lru")
    assert cache.admit((0, 0), 5.0, now=0.0, protect=set())
    assert cache.admit((0, 1), 5.0, now=0.0, protect=set())
    # both in flight until t=5: nothing may be evicted for a third, and the budget is full
    assert not cache.admit((0, 2), 6.0, now=1.0, protect=set())
    assert cache.admit((0, 2), 9.0, now=5.0, protect={(0, 1)})
    assert (0, 0) not in cache and cache.used == 20


def test_peak_is_the_most_bytes_ever_resident_on_a_hand_made_trace():
    """Every (used, peak) below is worked out by hand from the sizes; the peak (85) is neither the final
    residency (80) nor any residency seen before an admission adds its bytes (at most 50)."""
    sizes = {(0, 0): 40, (0, 1): 35, (0, 2): 20, (1, 0): 50, (1, 1): 10}
    cache = ExpertCache(100, sizes, pinned=[(1, 1)], eviction="lru")
    assert (cache.used, cache.peak) == (10, 10)  # the pinned 10
    steps = [
        ((0, 0), {(1, 1), (0, 0)}, 50, 50),  # 10 + 40
        ((0, 1), {(1, 1), (0, 0), (0, 1)}, 85, 85),  # 50 + 35: the peak
        ((0, 2), {(1, 1), (0, 1), (0, 2)}, 65, 85),  # 85 + 20 > 100: LRU (0, 0) out (45), then 45 + 20
        ((1, 0), {(1, 1), (0, 2), (1, 0)}, 80, 85),  # 65 + 50 > 100: (0, 1) out (30), then 30 + 50
    ]
    for key, resident, used, peak in steps:
        assert cache.admit(key, 0.0, now=0.0, protect=set())
        assert set(cache.ready) == resident and (cache.used, cache.peak) == (used, peak), key


def test_lfu_evicts_the_least_used():
    sizes = {(0, e): 10 for e in range(3)}
    cache = ExpertCache(20, sizes, eviction="lfu")
    for key, uses in (((0, 0), 3), ((0, 1), 1)):
        cache.admit(key, 0.0, now=0.0, protect=set())
        for _ in range(uses):
            cache.touch(key)
    cache.admit((0, 2), 0.0, now=0.0, protect=set())
    assert set(cache.ready) == {(0, 0), (0, 2)}


def test_budget_smaller_than_an_expert_is_one_clear_error():
    with pytest.raises(MoedgeError, match=r"smaller than the largest expert \(1,070 bytes\).*at least 1,070"):
        ExpertScheduler(_costs(), POLICIES["lru"], 999, BUILTIN["rtx4090-pcie4"])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("25%", 0.25), (0.5, 0.5), ("1KiB", 1024), ("2000", 2000), ("1.5kb", 1500)],
)
def test_parse_budget(spec, expected):
    costs = _costs()
    total = costs.expert_bytes()
    want = int(expected * total) if isinstance(expected, float) else expected
    assert parse_budget(spec, costs) == want


def test_parse_budget_rejects_nonsense():
    with pytest.raises(MoedgeError, match="cannot read GPU budget"):
        parse_budget("lots", _costs())
    with pytest.raises(MoedgeError, match="auto needs a device"):
        parse_budget("auto", _costs())


def test_routing_stats_round_trip_and_merge():
    rec = RoutingRecorder(EXPERTS, TOP_K)
    rng = np.random.default_rng(0)
    for layer in range(LAYERS):
        rec.record(layer, rng.integers(0, EXPERTS, size=(50, TOP_K)))
    doc = rec.to_dict()
    stats = RoutingStats.from_dict(json.loads(json.dumps(doc)))
    assert stats.tokens == 50 and sum(stats.counts[0]) == 100
    merged = stats.merge(stats)
    assert merged.tokens == 100 and (merged.counts[2] == 2 * stats.counts[2]).all()
    assert sum(n for _, n in merged.paths) == 100
    newer = dict(doc, format_version=99)
    with pytest.raises(MoedgeError, match="newer"):
        RoutingStats.from_dict(newer)


def test_placements_fit_and_cover():
    rng = np.random.default_rng(1)
    stats = _trace(rng, 300, skew=0.3).stats()
    sizes = {k: c.bytes for k, c in _costs().experts.items()}
    budget = sum(sizes.values()) // 4
    for plan in (plan_popularity(stats, sizes, budget), plan_haq(stats, sizes, budget, prefetch_share=0.5)):
        assert sum(sizes[k] for k in plan) <= budget and len(set(plan)) == len(plan)
    haq = plan_haq(stats, sizes, budget, path_fraction=0.0)
    per_layer = [sum(1 for li, _ in haq if li == layer) for layer in range(LAYERS)]
    assert max(per_layer) - min(per_layer) <= 2  # the top-up keeps layers even
    last = plan_last_layers(range(LAYERS), EXPERTS, sizes, budget * 2)
    assert {li for li, _ in last} == {LAYERS - 1, LAYERS - 2} or {li for li, _ in last} == {LAYERS - 1}


def test_plan_file_round_trip_and_bad_file(tmp_path):
    path = tmp_path / "plan.json"
    write_plan(path, [(0, 1), (2, 3)], budget=10, policy="haq", settings={"prefetch": 1}, source={})
    assert read_plan_file(path) == ([(0, 1), (2, 3)], {"prefetch": 1})
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(MoedgeError, match="not a moedge placement plan"):
        read_plan_file(tmp_path / "bad.json")


def test_profiles_have_sources_and_bad_profile_is_clear(tmp_path):
    for profile in BUILTIN.values():
        assert profile.sources, profile.name
        assert profile.transfer_time(1e6) > 0 and profile.cpu_time(1e6, 1e6, 1) > profile.gpu_time(
            1e6, 1e6, 1
        )
    with pytest.raises(MoedgeError, match="unknown hardware profile"):
        load_profile("a-toaster")
    (tmp_path / "p.json").write_text(json.dumps({"unified_memory": False, "bogus": 1}))
    with pytest.raises(MoedgeError, match="hardware profile"):
        load_profile(tmp_path / "p.json")


class _Checked(ExpertScheduler):
    """Asserts the invariants after every decision."""

    def dispatch(self, layer, experts, speculative_next=None):
        where = super().dispatch(layer, experts, speculative_next)
        assert set(where) == set(experts), "every routed expert is computed exactly once"
        assert all(where[e] in ("gpu", "cpu") for e in where)
        assert self.cache.used <= self.budget or self.policy.name == "full-gpu"
        assert self.cache.used == sum(self.cache.sizes[k] for k in self.cache.ready)
        return where


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    fraction=st.floats(0.05, 1.0),
    policy=st.sampled_from(sorted(POLICIES)),
    profile=st.sampled_from(sorted(BUILTIN)),
    prompt=st.integers(1, 5),
)
def test_scheduler_invariants_on_random_traces(seed, fraction, policy, profile, prompt):
    rng = np.random.default_rng(seed)
    costs = _costs()
    trace = _trace(rng, 40, skew=float(rng.uniform(0.1, 2.0)))
    budget = max(int(fraction * costs.expert_bytes()), 1070)
    # the resident set as the admit/evict callbacks report it, and the most bytes it ever held
    sizes = {k: c.bytes for k, c in costs.experts.items()}
    resident: set[tuple[int, int]] = set()
    true_peak = 0

    def admitted(key: tuple[int, int]) -> None:
        nonlocal true_peak
        resident.add(key)
        true_peak = max(true_peak, sum(sizes[k] for k in resident))

    sched = _Checked(
        costs,
        POLICIES[policy],
        budget,
        BUILTIN[profile],
        stats=trace.stats(),
        on_admit=admitted,
        on_evict=resident.remove,
    )
    for t in range(trace.chosen.shape[0]):
        tokens = prompt if t == 0 else 1
        sched.begin_step(tokens, t)
        for layer in range(LAYERS):
            sched.run_stage(layer)
            experts = {int(e): tokens for e in trace.chosen[t, layer]}
            nxt = [int(e) for e in trace.speculative[t, layer + 1]] if layer + 1 < LAYERS else None
            sched.dispatch(layer, experts, nxt)
        assert sched.end_step() > 0
    assert sched.cache.peak == true_peak <= max(budget, costs.expert_bytes() if policy == "full-gpu" else 0)
    summary = sched.summary()
    assert 0.0 <= summary["hit_rate"] <= 1.0
    if policy == "full-gpu":
        assert summary["hit_rate"] == 1.0
    if policy == "cpu":
        assert summary["hit_rate"] == 0.0 and summary["bytes_moved_per_token"] == 0


def test_replay_orders_policies_sensibly():
    """On a skewed trace and a discrete GPU, a resident cache beats all-CPU and full GPU beats both."""
    rng = np.random.default_rng(3)
    costs = _costs({(li, e): 2_600_000 for li in range(LAYERS) for e in range(EXPERTS)})  # smollm2-moe's size
    trace = _trace(rng, 200, skew=0.2)
    stats = trace.stats()
    budget = costs.expert_bytes() // 2
    ms = {
        name: replay(trace, costs, POLICIES[name], budget, BUILTIN["rtx4090-pcie4"], stats=stats)[
            "modeled_decode_ms"
        ]["mean"]
        for name in ("cpu", "static", "full-gpu")
    }
    assert ms["full-gpu"] < ms["static"] < ms["cpu"]


def test_tuned_haq_plan_fits_and_balancing_never_widens_the_spread():
    from moedge.runtime.simulate import balance_plan, tune_haq

    rng = np.random.default_rng(5)
    costs = _costs({(li, e): 2_600_000 for li in range(LAYERS) for e in range(EXPERTS)})
    trace = _trace(rng, 120, skew=0.3)
    budget = costs.expert_bytes() // 4
    hw = BUILTIN["jetson-agx-orin-64gb"]
    policy, summary = tune_haq(trace, costs, budget, hw, base=POLICIES["haq"], tokens=120)
    assert sum(costs.experts[tuple(k)].bytes for k in summary["plan"]) <= budget
    start = replay(trace, costs, policy, budget, hw, stats=trace.stats())
    balanced = balance_plan(trace, costs, policy, budget, hw, stats=trace.stats(), start=start)
    assert balanced["hit_rate_layer_std"] <= start["hit_rate_layer_std"]
    assert balanced["modeled_decode_ms"]["mean"] <= start["modeled_decode_ms"]["mean"] * 1.005 + 1e-12


class _PlainCountLfu(ExpertCache):
    """The LFU rule before decays existed: integer use counts, nothing done per step."""

    def step(self):
        pass

    def touch(self, key):
        self.frequency[key] = int(self.frequency.get(key, 0)) + 1
        if key in self.recency:
            self.recency.move_to_end(key)


@pytest.mark.parametrize("name", ["lfu", "moe-infinity"])
def test_lfu_decay_one_is_the_plain_count_replay(monkeypatch, name):
    from dataclasses import replace as with_fields

    import moedge.runtime.scheduler as scheduler

    rng = np.random.default_rng(11)
    costs = _costs({(li, e): 2_600_000 for li in range(LAYERS) for e in range(EXPERTS)})
    trace = _trace(rng, 150, skew=0.5)
    stats = trace.stats()
    budget = costs.expert_bytes() // 3
    hw = BUILTIN["jetson-agx-orin-64gb"]
    policy = with_fields(POLICIES[name], lfu_decay=1.0)
    assert POLICIES[name].lfu_decay == 1.0  # the default is plain counts
    now = replay(trace, costs, policy, budget, hw, stats=stats)
    monkeypatch.setattr(scheduler, "ExpertCache", _PlainCountLfu)
    before = replay(trace, costs, POLICIES[name], budget, hw, stats=stats)
    assert json.dumps(now, sort_keys=True) == json.dumps(before, sort_keys=True)
    decayed = replay(trace, costs, with_fields(policy, lfu_decay=0.8), budget, hw, stats=stats)
    assert decayed["plan"] == now["plan"] == []


def test_lfu_decay_lets_recent_use_beat_old_counts():
    """A used in steps 1-3, B in steps 4-5, then C needs room: plain counts evict B (2 uses < 3), a decay
    of 0.5 evicts A (0.22 against 0.75 by step 6), as recency says."""

    def run(decay):
        cache = ExpertCache(20, {(0, e): 10 for e in range(3)}, eviction="lfu", lfu_decay=decay)
        for step, key in enumerate([(0, 0)] * 3 + [(0, 1)] * 2):
            cache.step()
            if step in (0, 3):
                assert cache.admit(key, 0.0, now=0.0, protect=set())
            cache.touch(key)
        cache.step()
        assert cache.admit((0, 2), 0.0, now=0.0, protect=set())
        return set(cache.ready), cache.frequency

    kept, counts = run(1.0)
    assert kept == {(0, 0), (0, 2)} and counts == {(0, 0): 3.0, (0, 1): 2.0}
    kept, counts = run(0.5)
    assert kept == {(0, 1), (0, 2)}
    assert counts[(0, 0)] == pytest.approx(1.75 / 8) and counts[(0, 1)] == pytest.approx(0.75)
    with pytest.raises(MoedgeError, match="LFU decay"):
        ExpertCache(20, {(0, 0): 10}, eviction="lfu", lfu_decay=0.0)


def _grid_replays(trace, costs, name, grid, budget, hw, tokens):
    """Every grid point of ``grid`` on the first ``tokens`` tokens: (setting, mean ms, spread)."""
    import itertools
    from dataclasses import replace as with_fields

    from moedge.runtime.simulate import DecodeTrace as Trace

    short = Trace(trace.layers, trace.chosen[:tokens], trace.speculative[:tokens], trace.num_experts)
    out = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values, strict=True))
        s = replay(short, costs, with_fields(POLICIES[name], **setting), budget, hw, stats=trace.stats())
        out.append((setting, s["modeled_decode_ms"]["mean"], s["hit_rate_layer_std"]))
    return out


@pytest.mark.parametrize(
    ("name", "hw"),
    [
        ("lru", "jetson-orin-nano-8gb"),
        ("moe-infinity", "rtx4090-pcie4"),
        ("static", "jetson-agx-orin-64gb"),
        ("n-cpu-moe", "rtx4090-pcie4"),
    ],
)
def test_tune_policy_picks_the_fastest_grid_point_within_the_tie(name, hw):
    from moedge.runtime.simulate import policy_grid, tune_policy

    rng = np.random.default_rng(7)
    costs = _costs({(li, e): 2_600_000 for li in range(LAYERS) for e in range(EXPERTS)})
    trace = _trace(rng, 160, skew=0.3)
    budget = costs.expert_bytes() * 2 // 5
    grid = policy_grid(name, costs, budget)
    assert all(getattr(POLICIES[name], k) in v or k == "cpu_layers" for k, v in grid.items())
    policy, summary = tune_policy(
        trace, costs, budget, BUILTIN[hw], base=POLICIES[name], grid=grid, tokens=120, tie=0.01
    )
    points = _grid_replays(trace, costs, name, grid, budget, BUILTIN[hw], 120)
    chosen = {k: getattr(policy, k) for k in grid}
    ms = summary["modeled_decode_ms"]["mean"]
    assert chosen in [p[0] for p in points] and summary["decode_tokens"] == 120
    best = min(p[1] for p in points)
    assert ms <= best * 1.01  # the fastest, or within the tie of it ...
    tied = [p for p in points if p[1] <= best * 1.01]
    assert summary["hit_rate_layer_std"] == min(p[2] for p in tied)  # ... with the smallest spread there
    exact, _ = tune_policy(
        trace, costs, budget, BUILTIN[hw], base=POLICIES[name], grid=grid, tokens=120, tie=0
    )
    assert next(p[1] for p in points if p[0] == {k: getattr(exact, k) for k in grid}) == best


def test_tuning_lru_picks_per_layer_or_global_by_the_better_replay():
    """With ten experts' room (two slots a layer), layer 0 alternating between two pairs while the others
    keep one pair thrashes its two slots but fits one global LRU (global wins); with twelve (three slots a
    layer) on a random trace the per-layer LRU wins. Either way the tuner keeps the faster replay."""
    from moedge.runtime.simulate import tune_policy

    costs = _costs({(li, e): 2_600_000 for li in range(LAYERS) for e in range(EXPERTS)})
    one_expert = costs.expert_bytes() // (LAYERS * EXPERTS)
    hw = BUILTIN["jetson-orin-nano-8gb"]
    grid = {"per_layer": (True, False)}
    tokens = 120
    chosen = np.tile(np.array([0, 1], dtype=np.int16), (tokens, LAYERS, 1))
    chosen[1::2, 0] = [2, 3]
    spec = np.full((tokens, LAYERS, 4), -1, dtype=np.int16)
    alternating = DecodeTrace(list(range(LAYERS)), chosen, spec, EXPERTS)
    mixed = _trace(np.random.default_rng(0), tokens, skew=1.0)
    for trace, budget, want in ((alternating, 10 * one_expert, False), (mixed, 12 * one_expert, True)):
        (_, per_layer, _), (_, one, _) = _grid_replays(trace, costs, "lru", grid, budget, hw, tokens)
        assert (per_layer < one) == want
        policy, _ = tune_policy(
            trace, costs, budget, hw, base=POLICIES["lru"], grid=grid, tokens=tokens, tie=0
        )
        assert policy.per_layer == want


def test_n_cpu_moe_grid_starts_at_the_budget_filling_n():
    from dataclasses import replace as with_fields

    from moedge.runtime.simulate import fewest_cpu_layers, half_life_decay, policy_grid

    costs = _costs({(li, e): 1000 for li in range(LAYERS) for e in range(EXPERTS)})
    budget = 2 * EXPERTS * 1000 + 500  # two whole layers fit
    assert fewest_cpu_layers(costs, budget) == 2
    assert policy_grid("n-cpu-moe", costs, budget) == {"cpu_layers": (2, 3, 4)}  # capped at every layer
    trace = _trace(np.random.default_rng(0), 30)
    hw = BUILTIN["rtx4090-pcie4"]
    default = replay(trace, costs, POLICIES["n-cpu-moe"], budget, hw, stats=None)
    same = replay(trace, costs, with_fields(POLICIES["n-cpu-moe"], cpu_layers=2), budget, hw, stats=None)
    assert json.dumps(default, sort_keys=True) == json.dumps(same, sort_keys=True)
    more = replay(trace, costs, with_fields(POLICIES["n-cpu-moe"], cpu_layers=3), budget, hw, stats=None)
    assert {k[0] for k in more["plan"]} == {3} and more["hit_rate_per_layer"]["2"] == 0.0
    assert half_life_decay(64) ** 64 == pytest.approx(0.5) and half_life_decay(float("inf")) == 1.0
