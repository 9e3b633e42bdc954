"""One expert cache for both runtimes: every case of tests/data/expert_cache_traces.json through each.

Python: ``moedge.runtime.scheduler.ExpertScheduler`` (the decision path of a live run and of a replay)
on costs made of the case's expert sizes, one decode step per trace step: ``run_stage``, then
``dispatch`` of the chosen experts; hits are what ``dispatch`` counts as hits (resident and ready),
admissions and evictions come from the cache's ``on_admit``/``on_evict`` callbacks. C++:
``moedge-cache-trace TABLE`` (cpp/tests/cache_trace.cc, release and ASan builds of ``make cpp``) sets
up the Runner's cache (``make_expert_cache``) and meets each step as ``Runner::Impl::moe`` does.

C++ policy ``lru`` is Python's ``lru``; C++ ``pinned`` is Python's ``static`` given the plan (its
eviction is None: only the plan's experts are ever resident). Python's ``lru`` places nothing from a
plan (``moedge run`` warns that ``--plan`` has no effect), while ``moedge-run --policy lru --plan``
pins the plan and caches the rest: for an ``lru`` case with a ``pinned`` list, the Python side pins
those experts with ``ExpertCache.pin`` after the scheduler is made, which is the same cache rule
(pinned experts count against the budget, not against the per-layer slots, and are never evicted).

Cases with ``expected`` also match a result worked out by hand from the rule; those marked
``global_lru_differs`` are checked to come out otherwise under one LRU over all layers with no
protected experts (what moedge-run did before), so a C++ cache that kept that would fail them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from moedge._errors import MoedgeError
from moedge.runtime.cache import ExpertCache, ExpertKey
from moedge.runtime.costs import GraphCost, ModelCosts
from moedge.runtime.policies import POLICIES
from moedge.runtime.profiles import BUILTIN
from moedge.runtime.scheduler import ExpertScheduler

ROOT = Path(__file__).resolve().parents[2]
TABLE_PATH = ROOT / "tests" / "data" / "expert_cache_traces.json"
TABLE = json.loads(TABLE_PATH.read_text())
CASES: list[dict[str, Any]] = TABLE["cases"]
CLASSES: dict[str, dict[str, str]] = TABLE["error_classes"]
BUILDS = {"release": ROOT / "build" / "cpp", "asan": ROOT / "build" / "cpp-asan"}
PYTHON_POLICY = {"lru": "lru", "pinned": "static"}
STEP_KEYS = ("hits", "admitted", "cpu", "evicted", "resident", "used")


def _sizes(case: dict[str, Any]) -> dict[ExpertKey, int]:
    return {
        (layer, e): n
        for layer, row in zip(case["moe_layers"], case["sizes"], strict=True)
        for e, n in enumerate(row)
    }


def _costs(case: dict[str, Any]) -> ModelCosts:
    none = GraphCost(0, 0)
    return ModelCosts(
        moe_layers=list(case["moe_layers"]),
        num_experts=max(len(row) for row in case["sizes"]),
        top_k=1,
        experts={k: GraphCost(n, n) for k, n in _sizes(case).items()},
        stages={layer: none for layer in case["moe_layers"]},
        head=none,
        embedding=none,
        kv_bytes_per_token=0,
        int8=False,
        num_params=0,
    )


def _scheduler(case: dict[str, Any], events: list[tuple[str, ExpertKey]]) -> ExpertScheduler:
    pinned = [tuple(k) for k in case.get("pinned", [])]
    policy = POLICIES[PYTHON_POLICY[case["policy"]]]
    sched = ExpertScheduler(
        _costs(case),
        policy,
        case["budget"],
        BUILTIN["rtx4090-pcie4"],
        plan=pinned if policy.placement != "none" else None,
        on_admit=lambda k: events.append(("admit", k)),
        on_evict=lambda k: events.append(("evict", k)),
    )
    if policy.placement == "none":  # lru: Python places nothing from a plan; pin as moedge-run does
        for key in pinned:
            sched.cache.pin(key)
    return sched


def python_replay(case: dict[str, Any]) -> dict[str, Any]:
    """What the Python runtime's scheduler does with the case: the C++ driver's output format."""
    events: list[tuple[str, ExpertKey]] = []
    try:
        sched = _scheduler(case, events)
    except MoedgeError as e:
        return {"name": case["name"], "error": str(e)}
    steps = []
    for t, (layer, chosen) in enumerate(case["trace"]):
        sched.begin_step(1, t)
        sched.run_stage(layer)
        experts = sorted(set(chosen))
        hits = [e for e in experts if sched.cache.is_ready((layer, e), sched.clock)]  # dispatch's hit test
        events.clear()
        where = sched.dispatch(layer, dict.fromkeys(experts, 1))
        sched.end_step()
        admitted = [k[1] for kind, k in events if kind == "admit"]
        assert all(k[0] == layer for kind, k in events if kind == "admit")
        assert sorted(e for e in experts if where[e] == "gpu") == sorted(hits + admitted)
        steps.append(
            {
                "hits": hits,
                "admitted": admitted,
                "cpu": [e for e in experts if where[e] == "cpu"],
                "evicted": [list(k) for kind, k in events if kind == "evict"],
                "resident": sorted(list(k) for k in sched.cache.ready),
                "used": sched.cache.used,
            }
        )
    return {"name": case["name"], "per_layer_slots": sched.per_layer_slots, "steps": steps}


def global_lru_replay(case: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps under one LRU over all layers with nothing protected (what moedge-run did before)."""
    sizes = _sizes(case)
    cache = ExpertCache(case["budget"], sizes, pinned=[tuple(k) for k in case.get("pinned", [])])
    steps = []
    for layer, chosen in case["trace"]:
        step: dict[str, Any] = {"hits": [], "admitted": [], "cpu": [], "evicted": []}
        cache.on_evict = lambda k, step=step: step["evicted"].append(list(k))
        for e in sorted(set(chosen)):
            key = (layer, e)
            if key in cache:
                step["hits"].append(e)
            elif cache.admit(key, 0.0, now=0.0, protect=set()):
                step["admitted"].append(e)
            else:
                step["cpu"].append(e)
                continue
            cache.touch(key)
        steps.append({**step, "resident": sorted(list(k) for k in cache.ready), "used": cache.used})
    return steps


def _id(case: dict[str, Any]) -> str:
    return case["name"]


@pytest.fixture(scope="module", params=sorted(BUILDS))
def cpp_replay(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    """The C++ driver's output for every case (one run per build), by case name."""
    binary = BUILDS[request.param] / "moedge-cache-trace"
    if not binary.is_file():
        pytest.fail(f"{binary} is not built: run `make cpp` (make test does it first)")
    env = {"PATH": "/usr/bin:/bin", "ASAN_OPTIONS": "detect_leaks=1"}
    result = subprocess.run(
        [str(binary), str(TABLE_PATH)], capture_output=True, text=True, timeout=120, env=env
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return {out["name"]: out for out in json.loads(result.stdout)["cases"]}


def test_table_is_consistent():
    names = [case["name"] for case in CASES]
    assert len(set(names)) == len(names), "a case is listed twice"
    for case in CASES:
        assert case["policy"] in PYTHON_POLICY and len(case["moe_layers"]) == len(case["sizes"]), case["name"]
        sizes = _sizes(case)
        for layer, chosen in case["trace"]:
            assert chosen and len(set(chosen)) == len(chosen), case["name"]
            assert all((layer, e) in sizes for e in chosen), case["name"]
        assert all(tuple(k) in sizes for k in case.get("pinned", [])), case["name"]
        if "error" in case:
            assert case["error"] in CLASSES and "expected" not in case, case["name"]
        if "expected" in case and "steps" in case["expected"]:
            assert len(case["expected"]["steps"]) == len(case["trace"]), case["name"]
            assert all(tuple(s) == STEP_KEYS for s in case["expected"]["steps"]), case["name"]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_python_matches_the_hand_derived_rows(case):
    got = python_replay(case)
    if "error" in case:
        assert CLASSES[case["error"]]["python"] in got.get("error", ""), got
        return
    assert "error" not in got, got["error"]
    want = case.get("expected", {})
    if "per_layer_slots" in want:
        assert got["per_layer_slots"] == want["per_layer_slots"]
    if "steps" in want:
        assert got["steps"] == want["steps"]


@pytest.mark.parametrize("case", [c for c in CASES if c.get("global_lru_differs")], ids=_id)
def test_the_per_layer_rows_tell_a_global_lru_apart(case):
    assert global_lru_replay(case) != case["expected"]["steps"]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cpp_cache_does_what_python_does(cpp_replay, case):
    got = cpp_replay[case["name"]]
    want = python_replay(case)
    if "error" in case:
        assert CLASSES[case["error"]]["cpp"] in got.get("error", ""), got
        return
    assert got == want
    if "expected" in case:  # explicitly, not only through Python
        for key, value in case["expected"].items():
            assert got[key] == value, key
