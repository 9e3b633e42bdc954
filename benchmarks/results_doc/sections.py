"""The render functions of docs/RESULTS.md: one per template in this folder, in document order (SECTIONS).

Each takes the ``Results`` of ``benchmarks/results_doc.py`` and returns the values of its template's
placeholders, every figure already formatted with a fixed precision. To add a section: write
``<name>.md`` here with ``{placeholders}`` (a ``{cite}`` line under each table), add ``render_<name>``
below reading its JSON through ``res.get`` and citing it with ``res.cite``, and list it in SECTIONS.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


def _load(stem: str) -> ModuleType:
    """``<stem>.py`` beside this file (the later sections, split to keep each file short)."""
    name = f"moedge_results_doc_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{stem}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


parts, peers = _load("parts"), _load("peers")
Values = dict[str, Any]
table, med_range, sci = parts.table, parts.med_range, parts.sci


def render_intro(res: Any) -> Values:
    """The title, how the document is made, and the contents."""
    return {}


def render_perplexity_export(res: Any) -> Values:
    """smollm2-135m perplexity in PyTorch and in its ONNX export."""
    pt_file, ort_file = "smollm2_wikitext2_pytorch.json", "smollm2_wikitext2_ort.json"
    pt, ort = res.get(pt_file, "perplexity"), res.get(ort_file, "perplexity")
    return {
        "windows": res.get(pt_file, "windows"),
        "tokens": f"{res.get(pt_file, 'tokens'):,}",
        "pt": f"{pt:.5f}",
        "ort": f"{ort:.5f}",
        "pt9": f"{pt:.9f}",
        "ort9": f"{ort:.9f}",
        "pt3": f"{pt:.3f}",
        "rel": sci(abs(ort - pt) / pt),
        "cite": res.cite(pt_file, ort_file),
    }


def render_testbed(res: Any) -> Values:
    """smollm2-135m-moe against its dense source, and its routing statistics."""
    f = "testbed_report.json"
    moe = res.get(f, "smollm2-135m-moe")
    upcycle = moe["provenance"]["upcycle"]
    r = moe["routing"]
    seg, paths = r["four_layer_top1_segments"], r["whole_depth_top1_paths"]
    return {
        "windows": moe["perplexity"]["windows"],
        "dense": f"{res.get(f, 'smollm2-135m', 'perplexity', 'perplexity'):.4f}",
        "moe": f"{moe['perplexity']['perplexity']:.4f}",
        "ratio": f"{res.get(f, 'moe_over_dense'):.4f}",
        "experts": upcycle["num_experts"],
        "top_k": upcycle["top_k"],
        "sigma": upcycle["sigma"],
        "build_text": "C4 docs 0-999"
        if "C4 sample documents 0-999" in moe["provenance"]["build_text"]
        else "?",
        "routing_windows": res.get(f, "protocol", "routing_windows"),
        "routing_tokens": f"{r['tokens']:,}",
        "load": med_range(r["load_max_over_mean_per_layer"], ".2f"),
        "entropy": med_range(r["load_entropy_bits_per_layer"], ".2f").replace(" (", " bits ("),
        "predict": med_range(r["next_layer_top1_predictability"], ".2f"),
        "possible": f"{seg['possible']:,}",
        "uniform64": f"{seg['coverage_if_uniform_top64']:.3f}",
        "cover64": f"{seg['coverage_top64']:.2f}",
        "layers": len(r["load_entropy_bits_per_layer"]),
        "paths": f"{paths['distinct']:,} / {paths['coverage_top10']:.2f} / {paths['coverage_top100']:.2f}",
        "cite": res.cite(f),
    }


def _calibration_table(res: Any) -> str:
    """calibration_table.table() over the JSON under ``res.folder`` (its one renderer of that table)."""
    here = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, here)
    try:
        import calibration_table
    finally:
        sys.path.remove(here)
    for model in calibration_table.PLANS:
        res.get(f"calibration_{model}.json", "rows", "fp32", "eval")
    saved = calibration_table.RESULTS
    calibration_table.RESULTS = res.folder
    try:
        return str(calibration_table.table(list(calibration_table.PLANS)))
    finally:
        calibration_table.RESULTS = saved


def _ppl(res: Any, model: str, row: str, key: str = "wikitext2") -> float:
    return float(res.get(f"calibration_{model}.json", "rows", row, "eval", key, "perplexity"))


def _ratio(res: Any, model: str, row: str, key: str = "wikitext2") -> float:
    return _ppl(res, model, row, key) / _ppl(res, model, "fp32", key)


def _kept(names: list[str]) -> str:
    return ", ".join(f"`{n.removeprefix('model.')}`" for n in names)


def render_calibration(res: Any) -> Values:
    """The W8A8 calibration table (calibration_table.py's renderer), its rotations and their exactness."""
    d, m, s = "smollm2-135m", "smollm2-135m-moe", "stories260k"
    files = [f"calibration_{x}.json" for x in (d, m, s)]
    fp_full = res.get("smollm2_wikitext2_pytorch.json", "perplexity")
    rows = res.get(files[0], "rows")
    transcribed = [f"`{name}`" for name, row in rows.items() if "source" in row]
    note = (
        f"The smollm2-135m {', '.join(transcribed)} row is not a measured record: {rows['haq']['source']} "
        f"(legacy, not re-measured, written at {res.commit(files[0])}). "
        if transcribed
        else ""
    )
    auto_d = res.get(files[0], "rows", "haq+auto-fp", "calibration")
    auto_m = res.get(files[1], "rows", "haq+auto-fp", "calibration")
    strengths = res.get(files[0], "rows", "haq", "calibration", "smoothing_strengths")
    baselines = [_ratio(res, d, c) for c in ("rtn", "smoothquant", "gptq")]
    full = {
        c: _ppl(res, d, c, "wikitext2_full") / fp_full for c in ("haq", "haq+rot-full", "haq+rot-full+head")
    }
    sbs = "side_by_side.json"
    fp_ref = res.get(sbs, "ppl", "engines", "moedge-py-fp32-trt", "perplexity")

    def rot_row(label: str, cfg: str) -> list[str]:
        cells = [label, f"{_ppl(res, d, cfg, 'wikitext2_full'):.3f}", f"{full[cfg]:.3f}"]
        for key in ("ptb", "c4"):
            cells += [f"{_ppl(res, d, cfg, key):.3f}", f"{_ratio(res, d, cfg, key):.3f}"]
        return cells

    rot_table = table(
        ["smollm2-135m", "WikiText-2 full", "x FP32", "PTB (64 w)", "x FP32", "C4 (64 w)", "x FP32"],
        [
            rot_row("haq (no rotation)", "haq"),
            rot_row("haq+rot-full", "haq+rot-full"),
            rot_row("haq+rot-full, `--quantize-head` (lm_head W8A8 too)", "haq+rot-full+head"),
        ],
    )
    cal = {
        c: res.get(files[0], "rows", c, "calibration") for c in ("haq", "haq+rot-full", "haq+rot-full+head")
    }
    ex = "rotation_exactness.json"
    dense_ex, moe_ex = res.get(ex, d), res.get(ex, m)
    fake = res.get(sbs, "ppl", "engines", "moedge-fake-quant", "perplexity")
    cpu = res.get(sbs, "ppl", "engines", "moedge-py-cpu", "perplexity")
    return {
        "table": _calibration_table(res),
        "cite": res.cite(*files, "smollm2_wikitext2_pytorch.json", "testbed_report.json"),
        "transcribed": note,
        "dense_haq": f"{_ratio(res, d, 'haq'):.3f}",
        "dense_haq_full": f"{full['haq']:.3f}",
        "moe_haq": f"{_ratio(res, m, 'haq'):.3f}",
        "stories_haq": f"{_ratio(res, s, 'haq', 'stories'):.4f}",
        "stories_rot": f"{_ratio(res, s, 'haq+rot-full', 'stories'):.4f}",
        "baselines": f"{min(baselines):.1f}-{max(baselines):.1f}",
        "rtn": f"{_ratio(res, d, 'rtn'):.3f}",
        "sq": f"{_ratio(res, d, 'smoothquant'):.3f}",
        "gptq": f"{_ratio(res, d, 'gptq'):.3f}",
        "rtn_range": f"{_ratio(res, d, 'rtn+range'):.3f}",
        "sq_range": f"{_ratio(res, d, 'smoothquant+range'):.3f}",
        "gptq_range": f"{_ratio(res, d, 'gptq+range'):.3f}",
        **{
            f"share_{k}": f"{(_ratio(res, d, c) - _ratio(res, d, c + '+range')) / (_ratio(res, d, c) - _ratio(res, d, 'haq')):.0%}"
            for k, c in (("rtn", "rtn"), ("sq", "smoothquant"), ("gptq", "gptq"))
        },
        "range_rows": "WikiText-2, first 128 windows",
        "range_note": "calibrated with `--threads 1` beside the modeled policy benchmark and the test suite, so their seconds "
        "are not speed figures",
        "moe_auto": f"{_ratio(res, m, 'haq+auto-fp'):.3f}",
        "moe_kept": _kept(auto_m["kept_fp"]),
        "moe_kept_share": f"{auto_m['kept_fraction_of_linear_params']:.2%}",
        "dense_kept_share": f"{auto_d['kept_fraction_of_linear_params']:.2%}",
        "dense_kept": _kept(auto_d["kept_fp"]),
        "dense_haq_ppl": f"{_ppl(res, d, 'haq'):.3f}",
        "dense_auto_ppl": f"{_ppl(res, d, 'haq+auto-fp'):.3f}",
        "top_groups": strengths.get("0.9", 0),
        "groups": sum(strengths.values()),
        "a1_ppl": f"{_ppl(res, d, 'haq-a1'):.3f}",
        "a1_ratio": f"{_ratio(res, d, 'haq-a1'):.3f}",
        "bundle_vs_fake": f"{abs(cpu / fake - 1):.2%}",
        "rot_table": rot_table,
        "cite_rot": res.cite(files[0], "smollm2_wikitext2_pytorch.json", sbs),
        "rot_full": f"{full['haq+rot-full']:.3f}",
        "llama_ratio": f"{res.get(sbs, 'ppl', 'engines', 'llama.cpp', 'perplexity') / fp_ref:.3f}",
        "genai_ratio": f"{res.get(sbs, 'ppl', 'engines', 'genai-int8', 'perplexity') / fp_ref:.3f}",
        "head_full": f"{full['haq+rot-full+head']:.3f}",
        "rot_s": f"{cal['haq+rot-full']['seconds']:.0f} s",
        "rot_gb": f"{cal['haq+rot-full']['peak_rss_mb'] / 1024:.1f} GB",
        "head_s": f"{cal['haq+rot-full+head']['seconds']:.0f} s",
        "haq_s": f"{cal['haq']['seconds']:.0f} s",
        "exact_windows": dense_ex["windows"],
        "exact_seqlen": dense_ex["seqlen"],
        "exact_agree": f"{dense_ex['positions'] - dense_ex['top1_disagreements']:,}",
        "exact_positions": f"{dense_ex['positions']:,}",
        "moe_agree": f"{moe_ex['positions'] - moe_ex['top1_disagreements']:,}",
        "moe_positions": f"{moe_ex['positions']:,}",
        "exact_diff": sci(max(dense_ex["max_abs_logit_diff"], moe_ex["max_abs_logit_diff"])),
        "exact_rel": sci(max(dense_ex["relative_max_logit_diff"], moe_ex["relative_max_logit_diff"])),
        "moe_flips": f"{moe_ex['routing_flips']:,}",
        "moe_decisions": f"{moe_ex['routing_decisions']:,}",
        "moe_prob": sci(moe_ex["max_abs_router_prob_diff"]),
        "cite_exact": res.cite(ex),
    }


def readme_table(res: Any) -> str:
    """README's results table (between its results markers)."""
    return str(peers.readme_table(res, parts.policy_cells(res)))


render_bundle_parity = parts.render_bundle_parity
render_rotation_probe = parts.render_rotation_probe
render_calibration_speed = parts.render_calibration_speed
render_bundle_speed = parts.render_bundle_speed
render_policies = parts.render_policies
render_runtime_speed = parts.render_runtime_speed
render_side_by_side = peers.render_side_by_side
render_cpp = peers.render_cpp
render_rotation_parity = peers.render_rotation_parity


def render_demo(res: Any) -> Values:
    """`make demo`'s timed scenarios against their bars, and the cached run's table."""
    f = "demo_timing.json"
    results = res.doc(f)["results"]
    runs = {r["scenario"]: r for r in res.doc(f)["runs"]}
    rows = []
    for name, r in results.items():
        hits = runs[name]["cache_hits"]
        rows.append(
            [
                name,
                f"{r['wall_seconds']:.0f} s",
                f"{r['bar_seconds']:.0f} s",
                "yes" if r["met"] else "no",
                ", ".join(k for k, v in hits.items() if v) or "none",
                "yes" if r["cpp_tokens_match"] else "no",
            ]
        )
    cached = runs["cached"]
    fresh = (
        "The fresh-clone run left pip's download cache and the ONNX Runtime SDK (`~/.cache/moedge/ort-sdk`) "
        "as they were (`--cold-sdk` downloads the SDK too); where it spent its time (seconds): "
        + ", ".join(f"{k} {v:.0f}" for k, v in runs["fresh"]["steps_seconds"].items())
        + "; the rest of its wall time is the clone, `make env` and `make cpp`."
        if "fresh" in results
        else "The fresh-clone scenario (`--scenarios fresh`, bar 30 minutes) has not been timed on this machine yet."
    )
    return {
        "scenarios": ",".join(results),
        "table": table(["scenario", "wall", "bar", "met", "cache hits", "C++ tokens = Python"], rows),
        "cite": res.cite(f),
        "steps": ", ".join(f"{k} {v:.0f}" for k, v in cached["steps_seconds"].items()),
        "demo_table": "\n".join(results["cached"]["table"]),
        "fresh": fresh,
    }


SECTIONS: list[tuple[str, Callable[[Any], Values]]] = [
    ("intro", render_intro),
    ("perplexity_export", render_perplexity_export),
    ("testbed", render_testbed),
    ("calibration", render_calibration),
    ("calibration_speed", render_calibration_speed),
    ("bundle_parity", render_bundle_parity),
    ("rotation_probe", render_rotation_probe),
    ("rotation_parity", render_rotation_parity),
    ("bundle_speed", render_bundle_speed),
    ("policies", render_policies),
    ("runtime_speed", render_runtime_speed),
    ("side_by_side", render_side_by_side),
    ("cpp", render_cpp),
    ("exact_export", render_intro),
    ("demo", render_demo),
    ("legacy", render_intro),
]
__all__ = ["SECTIONS", "readme_table"]
