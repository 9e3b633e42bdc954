"""Formatting helpers and the later render functions of docs/RESULTS.md (see ``sections.py``)."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

Values = dict[str, Any]
MIB = 1 << 20


def sci(x: float, digits: int = 1) -> str:
    """Scientific notation without exponent padding: 1.6e-04 -> '1.6e-4'."""
    mant, exp = f"{x:.{digits}e}".split("e")
    return f"{mant}e{int(exp)}"


def pct(ratio: float, digits: int = 1) -> str:
    """A ratio's change as a signed percentage: 1.0071 -> '+0.7%'."""
    return f"{(ratio - 1) * 100:+.{digits}f}%"


def med_range(values: list[float], fmt: str) -> str:
    """'median (min-max)' with one format for the three."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_bundle_parity(res: Any) -> Values:
    """Split parity of the smollm2-135m-moe bundles, and the quantized model's own noise floor."""
    f, q = "bundle_parity_smollm2-135m-moe.json", "quant_noise_floor_smollm2-135m-moe.json"
    fp, w8 = res.get(f, "rows", "fp32"), res.get(f, "rows", "w8a8")

    def row(label: str, r: dict[str, Any], ratio: str) -> list[str]:
        flips = f"{r['router_flips']:,}"
        if r["router_flips"]:
            gaps = r["router_flip_gaps"]
            share = r["router_flips"] / r["router_decisions"]
            flips += f" ({share:.1%}; tie gap median {sci(gaps['median'], 0)}, max {gaps['max']:.3f})"
        ppl = f"{r['perplexity_pytorch']:.5f} / {r['perplexity_bundle']:.5f}"
        diff = (
            sci(r["max_abs_logit_diff"]) if r["max_abs_logit_diff"] < 1 else f"{r['max_abs_logit_diff']:.1f}"
        )
        return [label, f"{r['top1_agreement']:.5f}", ppl, ratio, flips, diff]

    rows = [
        row("FP32 bundle vs PyTorch FP32", fp, f"{fp['perplexity_ratio']:.8f}"),
        row("W8A8 bundle vs fake-quant PyTorch (HAQ recipe)", w8, f"{w8['perplexity_ratio']:.5f}"),
    ]
    header = ["bundle vs", "top-1 agreement", "perplexity (PyTorch / bundle)", "ratio"]
    header += ["router decisions flipped", "max abs logit diff"]
    ex = res.get(f, "rows", "w8a8-exactint-8w")
    return {
        "positions": f"{w8['predicted_tokens']:,}",
        "decisions": f"{w8['router_decisions']:,}",
        "table": table(header, rows),
        "cite": res.cite(f, q),
        "w8_rel": f"{abs(w8['perplexity_ratio'] - 1):.3%}",
        "qnf_commit": res.commit(q),
        "qnf_7": f"{res.get(q, 'w8a8', '1e-07', 'top1_agreement'):.4f}",
        "qnf_6": f"{res.get(q, 'w8a8', '1e-06', 'top1_agreement'):.4f}",
        "qnf_fp7": f"{res.get(q, 'fp32', '1e-07', 'top1_agreement'):.4f}",
        "qnf_fp6": f"{res.get(q, 'fp32', '1e-06', 'top1_agreement'):.4f}",
        "unopt": f"{res.get(f, 'rows', 'w8a8-unoptimized-8w', 'top1_agreement'):.4f}",
        "opt": f"{res.get(f, 'rows', 'w8a8-8w', 'top1_agreement'):.4f}",
        "exact": f"{ex['top1_agreement']:.4f}",
        "exact_ratio": f"{ex['perplexity_ratio']:.4f}",
    }


def render_rotation_probe(res: Any) -> Values:
    """Ranges and perplexity with only down_proj's input quantized, per transform."""
    f = "rotation_probe.json"
    fp32 = res.get(f, "fp32_perplexity")
    ppl, ranges = res.get(f, "perplexity"), res.get(f, "ranges_over_layers")
    labels = {"none": "none", "smooth": "smooth", "rotate": "rotate", "smooth+rotate": "smooth then rotate"}
    rows = []
    for key, label in labels.items():
        g, p = ranges[key], ppl[key]
        rows.append(
            [
                label,
                f"{g['absmax_mean']:.1f} / {g['absmax_max']:.1f}",
                f"{g['ratio_mean']:.1f} / {g['ratio_max']:.1f}",
                f"{g['absmax_no_sink_mean']:.1f} / {g['absmax_no_sink_max']:.1f}",
                *(f"{p[k]:.2f}" for k in ("absmax", "absmax_no_sink", "absmax_no_sink_fp_sink")),
            ]
        )
    header = ["variant", "absmax, mean / max over layers", "absmax / median token absmax, mean / max"]
    header += ["absmax without position 0, mean / max", "ppl, absmax", "ppl, no sink (clamped)"]
    header += ["ppl, no sink (FP)"]
    checks = res.get(f, "exact_checks")
    exact = max(checks[k]["relative_change"] for k in ("smooth", "rotate", "smooth+rotate"))
    return {
        "fp32": f"{fp32:.3f}",
        "exact": sci(exact),
        "table": table(header, rows),
        "cite": res.cite(f),
        "both": pct(ppl["smooth+rotate"]["absmax"] / fp32),
        "rot": pct(ppl["rotate"]["absmax"] / fp32, 0),
        "smooth": pct(ppl["smooth"]["absmax"] / fp32, 0),
        "sink_max": f"{ranges['none']['sink_absmax_max']:,.0f}",
        "sink_layers": ranges["none"]["layers_absmax_at_position_0"],
        "layers": res.get(f, "layers"),
        "rot_clamped": f"{ppl['rotate']['absmax_no_sink']:.1f}",
        "both_fp": pct(ppl["smooth+rotate"]["absmax_no_sink_fp_sink"] / fp32, 2),
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def render_bundle_speed(res: Any) -> Values:
    """W8A8 against FP32 on ORT CPU: one expert, the whole bundle, bytes, split time."""
    f = "bundle_speed.json"
    syn, small = res.get(f, "synthetic_expert"), res.get(f, "smollm2_experts")
    whole, sizes, split = res.get(f, "whole_bundle"), res.get(f, "sizes"), res.get(f, "split")
    spin = res.get(f, "spinning")

    def ms(x: float) -> str:
        return f"{x:.3g} ms"

    def ex_rows(first: str, d: dict[str, Any]) -> list[list[str]]:
        out = []
        for n, label in ((1, first), (64, "same")):
            c = d[f"{n}_tokens"]
            out.append([label, str(n), ms(c["fp32_ms"]), ms(c["w8a8_ms"]), f"{c['speedup']:.2f}x"])
        return out

    rows = ex_rows(f"Mixtral-shaped expert, hidden {syn['hidden']} / intermediate {syn['intermediate']}", syn)
    rows += ex_rows("smollm2-135m-moe expert (576 / 1536)", small)
    fp, w8, ratio = whole["fp32"], whole["w8a8"], whole["w8a8_vs_fp32"]
    rows.append(
        [
            "whole smollm2-135m-moe bundle, 128-token prompt",
            "128",
            f"{fp['prompt_tokens_per_s']:.0f} tok/s",
            f"{w8['prompt_tokens_per_s']:.0f} tok/s",
            f"{ratio['prompt_tokens_per_s']:.2f}x",
        ]
    )
    rows.append(
        [
            "whole bundle, greedy decode through the KV cache",
            "1",
            f"{fp['decode_tokens_per_s']:.1f} tok/s",
            f"{w8['decode_tokens_per_s']:.1f} tok/s",
            f"{ratio['decode_tokens_per_s']:.2f}x",
        ]
    )
    tiny = split["tiny_mixtral_split"]
    return {
        "repeats": res.get(f, "repeats"),
        "table": table(["graph", "tokens", "FP32", "W8A8 QDQ", "speedup"], rows),
        "cite": res.cite(f),
        "call_us": f"{small['1_tokens']['ort_call_overhead_ms'] * 1000:.0f} us",
        "call_us64": f"{small['64_tokens']['ort_call_overhead_ms'] * 1000:.0f} us",
        "share1": f"{small['1_tokens']['overhead_share_of_w8a8']:.0%}",
        "share64": f"{small['64_tokens']['overhead_share_of_w8a8']:.0%}",
        "spin_s": f"{spin['spinning']['prefill16_plus_8_decode_s']:.1f} s",
        "nospin_s": f"{spin['not_spinning']['prefill16_plus_8_decode_s']:.2f} s",
        "spin_ratio": f"{spin['ratio']:.0f}x",
        "expert_ratio": f"{sizes['expert_bytes_ratio']['max']:.3f}",
        "stage_ratio": f"{sizes['stage_bytes_ratio']['max']:.3f}",
        "bundle_w8": _mb(sizes["bundle_bytes"]["w8a8"]),
        "bundle_fp": _mb(sizes["bundle_bytes"]["fp32"]),
        "experts_w8": _mb(sizes["expert_bytes"]["w8a8"]),
        "experts_fp": _mb(sizes["expert_bytes"]["fp32"]),
        "embedding": _mb(sizes["embedding_bytes"]["fp32"]),
        "head": f"{sizes['head_bytes']['w8a8'] / 1e3:.0f} KB",
        "split_s": f"{split['smollm2_135m_moe_split_bundle_s']:.1f} s",
        "tiny_split": ", ".join(f"{tiny[k]['split_s']:.3f}" for k in sorted(tiny, key=int)) + " s",
    }


POLICIES = ["cpu", "lru", "lfu", "static", "n-cpu-moe", "fate", "moe-infinity", "haq"]
POLICY_LABELS = ["cpu", "lru (mixtral-offloading)", "lfu", "static (Fiddler)", "n-cpu-moe (llama.cpp)"]
POLICY_LABELS += ["fate (Fate)", "moe-infinity (MoE-Infinity)", "haq", "spread haq / lru"]


def policy_cells(res: Any, f: str = "runtime/runtime_policies.json") -> list[dict[str, Any]]:
    """The policy table's cells: ``results.cells`` in a file written before the provenance schema, the
    document's ``runs`` in one written through ``write_result`` (its results leave the cells out)."""
    doc = res.doc(f)
    results = doc["results"]
    if doc["schema"] is not None and not (isinstance(results, dict) and "cells" in results):
        return list(doc["runs"])
    return list(res.get(f, "cells"))


def _knob(key: str, value: Any) -> str:
    """One tuned setting, compactly."""
    if key == "per_layer":
        return "per-layer" if value else "global"
    if key == "lfu_decay":
        return "no decay" if value == 1 else f"half-life {math.log(0.5) / math.log(value):.3g}"
    if key == "static_fraction":
        return f"pin {value:.0%}"
    if key == "cpu_layers":
        return f"N={value}"
    names = {"prefetch": "prefetch", "prefetch_share": "share", "path_fraction": "paths"}
    return (
        f"{names.get(key, key)} {value:g}" if isinstance(value, float) else f"{names.get(key, key)} {value}"
    )


def _settings(c: dict[str, Any]) -> str:
    """A cell's tuned settings (the knobs in its ``tuned_over``), compactly; n-cpu-moe's N with its range."""
    grid, chosen = c.get("tuned_over") or {}, c.get("settings") or {}
    out = []
    for key in grid:
        if key == "prefetch_share" and not chosen.get("prefetch"):
            continue  # no prefetch: the share does not matter
        text = _knob(key, chosen[key])
        if key == "cpu_layers" and min(grid[key]) != max(grid[key]):
            text += f" ({min(grid[key])}-{max(grid[key])})"
        out.append(text)
    return ", ".join(out) or "-"


def _grid(key: str, values: list[Any]) -> str:
    """One knob's grid, compactly."""
    if key == "per_layer":
        return "per-layer/global LRU"
    if key == "lfu_decay":
        lives = ["inf" if v == 1 else f"{math.log(0.5) / math.log(v):.3g}" for v in values]
        return "LFU half-life " + "/".join(lives) + " tokens"
    if key == "static_fraction":
        return "pinned share " + "/".join(f"{v:.0%}" for v in values)
    if key == "cpu_layers":
        return "N (first MoE layers on the CPU) from the budget-filling value up by 1, 2 and 4"
    names = {"prefetch": "prefetch depth", "prefetch_share": "prefetch share", "path_fraction": "path share"}
    return f"{names.get(key, key)} " + "/".join(f"{v:g}" for v in values)


def _tuned_settings(res: Any, f: str, cells: dict[tuple[str, float, str], dict[str, Any]]) -> str:
    """The paragraph and table of every policy's tuned settings per cell ('' for a table in which only
    haq was tuned)."""
    if not all("settings" in c for c in cells.values()):
        return ""
    profiles = list(res.get(f, "profiles"))
    budgets = sorted({k[1] for k in cells})
    tuned = [p for p in POLICIES if cells[(profiles[0], budgets[0], p)].get("tuned_over")]
    rows = []
    for prof in profiles:
        for i, b in enumerate(budgets):
            rows.append(
                [prof if i == 0 else "", f"{b:.0%}", *(_settings(cells[(prof, b, p)]) for p in tuned)]
            )
    first = {p: cells[(profiles[0], budgets[0], p)]["tuned_over"] for p in tuned}
    grids = "; ".join(f"`{p}` " + " x ".join(_grid(k, v) for k, v in first[p].items()) for p in tuned)
    text = (
        f"Every policy is tuned per cell as `haq` is: each setting of its own knobs replays the first "
        f"{res.get(f, 'tune_tokens'):,} tokens of the statistics trace on the cell's profile and budget, the "
        "lowest modeled decode latency wins (settings within 1% of it: the smaller per-layer hit-rate "
        "spread), and the table above replays the chosen setting on the evaluation trace. Grids (each holds "
        f"the policy's default): {grids} (`haq`'s prefetch share only with prefetch, then its balancing pass). "
        "`static` tunes only its pinned share: Fiddler keeps no dynamic cache, so a smaller share leaves "
        "budget unused; `fate` pins nothing, so the prefetch share (which shapes only `haq`'s placement) is "
        "not tuned. Chosen settings (LFU half-lives in tokens; N: first MoE layers on the CPU, with the range "
        "tried where the budget left more than one):"
    )
    header = ["profile", "budget", *(POLICY_LABELS[POLICIES.index(p)] for p in tuned)]
    text = textwrap.fill(text, 105, break_long_words=False, break_on_hyphens=False)
    return f"\n\n{text}\n\n{table(header, rows)}"


def render_policies(res: Any) -> Values:
    """The modeled expert-cache policy table, the haq spread study and the memory sweep."""
    f, h = "runtime/runtime_policies.json", "runtime/haq_spread_study.json"
    cells = {(c["profile"], c["budget_fraction"], c["policy"]): c for c in policy_cells(res, f)}
    profiles = list(res.get(f, "profiles"))
    budgets = sorted({c[1] for c in cells})
    rows = []
    for prof in profiles:
        full = res.get(f, "full_gpu", prof, "modeled_decode_ms", "mean")
        for i, b in enumerate(budgets):
            row = [f"{prof} (full GPU {full:.2f})" if i == 0 else "", f"{b:.0%}"]
            for pol in POLICIES:
                c = cells[(prof, b, pol)]
                ms = f"{c['modeled_decode_ms']['mean']:.2f}"
                row.append(f"{f'**{ms}**' if pol == 'haq' else ms} / {c['hit_rate']:.2f}")
            std = [cells[(prof, b, p)]["hit_rate_layer_std"] for p in ("haq", "lru")]
            row.append(f"{std[0]:.3f} / {std[1]:.3f}")
            rows.append(row)
    fastest = res.get(f, "checks", "haq_fastest")
    rtx = {c["budget"]: c["haq_ms"] / c["best_other_ms"] for c in fastest if c["profile"] == "rtx4090-pcie4"}

    def faster(r: float) -> str:
        return f"{abs(r - 1):.1%} {'faster' if r < 1 else 'slower'}"

    rtx_spread = [cells[("rtx4090-pcie4", b, "haq")]["hit_rate_layer_std"] for b in budgets]
    rtx_lru = [cells[("rtx4090-pcie4", b, "lru")]["hit_rate_layer_std"] for b in budgets]
    jetsons = [(p, b) for p in profiles if p.startswith("jetson") for b in budgets]
    spread_ok = sum(
        cells[(p, b, "haq")]["hit_rate_layer_std"] <= cells[(p, b, "lru")]["hit_rate_layer_std"]
        for p, b in jetsons
    )
    lru10 = cells[("jetson-orin-nano-8gb", 0.1, "lru")]
    rtx_lru10 = cells[("rtx4090-pcie4", 0.1, "lru")]
    replays = res.get(h, "replays")
    c4, wt = replays["stats (c4)"], replays["eval (wikitext2)"]
    expert_bytes = res.get(f, "expert_bytes")
    one = expert_bytes / 240
    prof = res.get(f, "profiles", "rtx4090-pcie4")
    mem = res.get(f, "memory")
    nano, agx, rtxm = (mem[p]["smallest_within_1.25x"] for p in profiles)
    devb = cells[(profiles[0], budgets[0], "cpu")]["device_bytes"]
    sweep = mem["rtx4090-pcie4"]["sweep"]
    at60 = next(s for s in sweep if s["budget_fraction"] == 0.6)
    settings = _tuned_settings(res, f, cells)
    return {
        "tuning": "every policy's tuning" if settings else "the `haq` tuning",
        "settings": settings,
        "expert_mib": f"{expert_bytes / MIB:.0f} MiB",
        "stats_tokens": f"{res.get(f, 'stats_tokens'):,}",
        "eval_tokens": f"{res.get(f, 'eval_tokens'):,}",
        "context": res.get(f, "context"),
        "recall2": f"{res.get(f, 'speculative_recall', 'top2_candidates'):.3f}",
        "recall4": f"{res.get(f, 'speculative_recall', 'top4_candidates'):.3f}",
        "table": table(["profile", "budget", *POLICY_LABELS], rows),
        "cite": res.cite(f),
        "haq_fastest": sum(1 for c in fastest if c["ok"]),
        "haq_strict": sum(1 for c in fastest if c["haq_ms"] < c["best_other_ms"]),
        "bundle": str(res.get(f, "bundle")).replace(str(Path.home()), "~"),
        "lru10_setting": ", ".join(_knob(k, v) for k, v in lru10.get("settings", {}).items())
        or "its default",
        "lru10_hit": f"{lru10['hit_rate']:.2f}",
        "rtx_lru10_setting": ", ".join(_knob(k, v) for k, v in rtx_lru10.get("settings", {}).items())
        or "default",
        "rtx_lru10_hit": f"{rtx_lru10['hit_rate']:.2f}",
        "jet_spread_ok": spread_ok,
        "jet_cells": len(jetsons),
        "rtx_larger": sum(a > b for a, b in zip(rtx_spread, rtx_lru, strict=True)),
        "rtx_cells": len(budgets),
        "cells": len(fastest),
        "rtx40": faster(rtx[0.4]),
        "rtx60": faster(rtx[0.6]),
        "lru25": f"{cells[(profiles[0], 0.25, 'lru')]['hit_rate']:.2f}",
        "rtx_spread": f"{min(rtx_spread):.3f}-{max(rtx_spread):.3f}",
        "rtx_lru_spread": f"{min(rtx_lru):.3f}-{max(rtx_lru):.3f}",
        "spread_budget": f"{res.get(h, 'budget_fraction'):.0%}",
        "c4_greedy": f"{c4['greedy']['layer_std']:.3f}",
        "c4_searched": f"{c4['searched']['layer_std']:.3f}",
        "c4_lru": f"{c4['lru']['layer_std']:.3f}",
        "wt_greedy": f"{wt['greedy']['layer_std']:.3f}",
        "wt_searched": f"{wt['searched']['layer_std']:.3f}",
        "wt_lru": f"{wt['lru']['layer_std']:.3f}",
        "cite_spread": res.cite(h),
        "rtx25_hit": f"{cells[('rtx4090-pcie4', 0.25, 'haq')]['hit_rate']:.2f}",
        "expert_one": f"{one / MIB:.1f} MiB",
        "h2d_us": f"{(one / prof['h2d_bandwidth'] + prof['transfer_latency']) * 1e6:.0f} us",
        "h2d_gbps": f"{prof['h2d_bandwidth'] / 1e9:.0f}",
        "jet_budget": f"{nano['budget_fraction']:.0%}",
        "nano_ratio": f"{nano['ratio_to_full_gpu']:.2f}",
        "agx_ratio": f"{agx['ratio_to_full_gpu']:.2f}",
        "jet_mib": f"{nano['device_bytes'] / MIB:.0f} MiB",
        "graphs_mib": f"{devb['graphs'] / MIB:.0f} MiB",
        "experts_mib": f"{(nano['device_bytes'] - devb['graphs'] - devb['kv_cache']) / MIB:.0f} MiB",
        "kv_mib": f"{devb['kv_cache'] / MIB:.0f} MiB",
        "jet_frac": f"{nano['fraction_of_fp16_footprint']:.3f}",
        "fp16_mib": f"{mem[profiles[0]]['fp16_all_on_gpu_bytes'] / MIB:,.0f} MiB",
        "rtx_budget": f"{rtxm['budget_fraction']:.0%}",
        "rtx_ratio": f"{rtxm['ratio_to_full_gpu']:.2f}",
        "rtx_mib": f"{rtxm['device_bytes'] / MIB:.0f} MiB",
        "rtx_frac": f"{rtxm['fraction_of_fp16_footprint']:.3f}",
        "rtx60_ratio": f"{at60['ratio_to_full_gpu']:.2f}",
        "rtx60_frac": f"{at60['fraction_of_fp16_footprint']:.3f}",
        "sweep_lo": f"{sweep[0]['budget_fraction']:.0%}",
        "sweep_hi": f"{sweep[-1]['budget_fraction']:.0%}",
    }


SPEED_ROWS = [
    ("w8a8 bundle", "smollm2-135m-moe W8A8 bundle (HAQ recipe)"),
    ("fp32 bundle", "smollm2-135m-moe FP32 bundle"),
    ("pytorch eager fp32", "smollm2-135m-moe PyTorch eager FP32"),
    ("dense w8a8 bundle", "smollm2-135m W8A8 bundle (HAQ recipe, FP32 lm_head)"),
    (
        "dense w8a8 bundle (smollm2-135m-w8a8head-bundle)",
        "smollm2-135m W8A8 bundle (HAQ recipe, `--quantize-head`)",
    ),
    ("llama.cpp", "smollm2-135m llama.cpp Q8_0"),
]


def render_runtime_speed(res: Any) -> Values:
    """Prompt and decode speed of the bundles, PyTorch and llama.cpp, and where a decode step goes."""
    f = "runtime/runtime_speed.json"
    v = res.get(f, "variants")
    rows = [
        [label, f"{v[k]['prompt_tokens_per_s']:.0f}", f"{v[k]['decode_tokens_per_s']:.1f}"]
        for k, label in SPEED_ROWS
    ]
    dec = {k: v[k]["decode_tokens_per_s"] for k, _ in SPEED_ROWS}
    head_key = SPEED_ROWS[4][0]
    by = res.get(f, "decode_ms_per_token_by_graph")
    d, hd, m = by["dense w8a8 bundle"], by[head_key], by["w8a8 bundle"]
    expert_bytes = res.get("bundle_speed.json", "sizes", "expert_bytes", "w8a8")
    return {
        "threads": res.get(f, "threads"),
        "prompt": res.get(f, "prompt_tokens"),
        "new": res.get(f, "new_tokens"),
        "repeats": res.get(f, "repeats"),
        "table": table(["variant", "prompt tok/s", "decode tok/s"], rows),
        "cite": res.cite(f),
        "dense_head_vs_llama": f"{dec[head_key] / dec['llama.cpp']:.3f}",
        "dense_vs_llama": f"{dec['dense w8a8 bundle'] / dec['llama.cpp']:.3f}",
        "prompt_head_vs_llama": f"{v[head_key]['prompt_tokens_per_s'] / v['llama.cpp']['prompt_tokens_per_s']:.2f}",
        "moe_vs_fp32": f"{dec['w8a8 bundle'] / dec['fp32 bundle']:.3f}",
        "moe_vs_torch": f"{dec['w8a8 bundle'] / dec['pytorch eager fp32']:.1f}",
        "d_total": f"{d['total']:.1f}",
        "layers": 30,
        "d_stages": f"{d['stages']:.1f}",
        "d_head": f"{d['head']:.1f}",
        "d_emb": f"{d['embedding']:.1f}",
        "d_other": f"{d['other']:.1f}",
        "h_head": f"{hd['head']:.1f}",
        "m_total": f"{m['total']:.1f}",
        "m_stages": f"{m['stages']:.1f}",
        "expert_calls": 60,
        "m_experts": f"{m['experts']:.1f}",
        "m_head": f"{m['head']:.1f}",
        "m_other": f"{m['other']:.1f}",
        "expert_mb": f"{expert_bytes / 240 / MIB:.1f} MiB",
    }


PHASE_LABELS = {
    "capture": "capture",
    "rotate-residual": "residual rotation",
    "observe": "observe",
    "smooth": "smoothing search",
    "rotate": "online rotation",
    "decide": "GPTQ + range search",
    "swap": "swap",
    "propagate": "quantized pass",
    "other": "other",
}


def render_calibration_speed(res: Any) -> Values:
    """Calibration time of today's haq + rotate full against the pre-rotation HAQ, in one run."""
    f = "calibration_speed.json"
    doc = res.get(f)
    rows, phase_rows = [], []
    for model, r in doc.items():
        base, now = r["baseline"], r["current"]
        rows.append(
            [
                model,
                f"{base['seconds']:.0f} s, {base['peak_rss_mb'] / 1024:.1f} GB",
                f"{now['seconds']:.0f} s, {now['peak_rss_mb'] / 1024:.1f} GB",
                f"{r['ratio']:.3f}x",
                f"<= {r['bar']}x: {'met' if r['met'] else 'not met'}",
                f"{base['load_average_before'][0]:.1f} / {now['load_average_before'][0]:.1f}",
            ]
        )
        phases = now.get("phase_seconds") or {}
        total = sum(phases.values()) or 1.0
        cells = [f"{phases.get(k, 0.0):.0f} s ({phases.get(k, 0.0) / total:.0%})" for k in PHASE_LABELS]
        phase_rows.append([model, *cells])
    header = ["model", "HAQ at the baseline commit", "haq + rotate full today", "today / baseline", "bar"]
    header += ["1-min load average at start (baseline / today)"]
    return {
        "baseline": next(iter(doc.values()))["baseline"]["commit"],
        "table": table(header, rows),
        "phases": table(["model", *PHASE_LABELS.values()], phase_rows),
        "cite": res.cite(f),
    }
