"""The side-by-side, C++ runner and README render functions of docs/RESULTS.md (see ``sections.py``)."""

from __future__ import annotations

from typing import Any

Values = dict[str, Any]
MIB = 1 << 20
SBS = "side_by_side.json"
ENGINES = [
    ("moedge-py-cpu", "moedge Python, ort-cpu target"),
    ("moedge-cpp", "moedge-run (C++), ort-cpu target"),
    ("moedge-py-trt", "moedge Python, tensorrt target"),
    ("moedge-cpp-trt", "moedge-run (C++), tensorrt target"),
    ("moedge-fake-quant", "the recipe's fake-quant model (PyTorch)"),
    ("moedge-py-untied-trt", "moedge Python, tensorrt target, scales not tied"),
    ("llama.cpp", "llama.cpp Q8_0"),
    ("genai-int8", "ORT GenAI int8"),
    ("genai-int4", "ORT GenAI int4"),
    ("genai-fp32", "ORT GenAI fp32"),
    ("moedge-py-fp32-trt", "moedge Python FP32, tensorrt target"),
    ("moedge-py-fp32-cpu", "moedge Python FP32, ort-cpu target"),
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _engine_row(res: Any, key: str, label: str) -> list[str]:
    ppl = res.get(SBS, "ppl", "engines").get(key)
    speed = res.get(SBS, "speed", "engines").get(key)
    size = res.get(SBS, "bytes", "engines").get(key)
    rss = res.get(SBS, "rss", "engines").get(key)
    row = [label]
    row += [f"{ppl['perplexity']:.3f}", f"{ppl['vs_fp32']:.3f}"] if ppl else ["-", "-"]
    if speed:
        row += [
            f"{speed['prompt_tokens_per_s']:,.0f}",
            f"{speed['decode_tokens_per_s']:.1f}",
            f"{speed['decode_tokens_per_s_short']:.1f}",
            f"{speed['decode_vs_genai-int8']:.2f}",
            f"{speed['decode_vs_llama.cpp']:.2f}",
        ]
    else:
        row += [""] * 5
    row.append(f"{size['bytes'] / 1e6:.1f}" if size else "")
    row.append(f"{rss['peak_rss_bytes'] / MIB:.0f}" if rss else "")
    if not speed:  # an accuracy-only row: no empty columns after its figures
        row = row[:3] + [""] * 7
    return row


def render_side_by_side(res: Any) -> Values:
    """moedge's bundles against llama.cpp and ORT GenAI on dense smollm2-135m, and the MoE bar."""
    speed, ppl, rss = (res.get(SBS, p, "engines") for p in ("speed", "ppl", "rss"))
    wl = res.get(SBS, "speed", "workload")
    header = [
        "engine",
        "ppl",
        "x FP32",
        "prompt tok/s",
        "decode tok/s",
        "decode at 16",
        "decode x GenAI int8",
    ]
    header += ["decode x llama.cpp", "MB on disk", "peak RSS MiB"]
    rows = [_engine_row(res, k, label) for k, label in ENGINES]
    py, cpp, genai = (speed[k] for k in ("moedge-py-cpu", "moedge-cpp", "genai-int8"))
    fake = ppl["moedge-fake-quant"]["perplexity"]
    bar = res.get(SBS, "speed", "moe_bar")
    moe_rows = [
        [
            "Python, runtime dispatch (stage + 2 expert sessions a layer, numpy gating)",
            f"{bar['moe_decode_tokens_per_s']:.1f}",
            f"{bar['moe_over_bar']:.2f}",
            f"{speed['moedge-py-moe-fp32-cpu']['decode_tokens_per_s']:.1f}",
            f"{bar['moe_over_fp32_twin']:.2f}",
        ],
        [
            "Python, `--experts-in-graph` (one graph, gating and `If` per expert inside)",
            f"{bar['in_graph_decode_tokens_per_s']:.1f}",
            f"{bar['in_graph_over_bar']:.2f}",
            f"{speed['moedge-py-moe-graph-fp32-cpu']['decode_tokens_per_s']:.1f}",
            f"{bar['in_graph_over_fp32_twin']:.2f}",
        ],
        [
            "`moedge-run`, runtime dispatch",
            f"{bar['cpp_decode_tokens_per_s']:.1f}",
            f"{bar['cpp_over_bar']:.2f}",
            "",
            "",
        ],
        [
            "`moedge-run`, `--experts-in-graph`",
            f"{bar['cpp_in_graph_decode_tokens_per_s']:.1f}",
            f"{bar['cpp_in_graph_over_bar']:.2f}",
            "",
            "",
        ],
    ]
    moe_header = [
        "smollm2-135m-moe, ort-cpu target",
        "W8A8 decode tok/s",
        "x bar",
        "FP32 twin",
        "W8A8 x FP32",
    ]
    cpp_vs_genai = cpp["decode_vs_genai-int8"]
    pr = [speed[k]["prompt_vs_llama.cpp"] for k in ("moedge-py-cpu", "moedge-cpp")]
    return {
        "ort": speed["moedge-cpp"].get("onnxruntime", "?"),
        "threads": wl["threads"],
        "prompt": wl["prompt_tokens"],
        "new": wl["new_tokens"],
        "repeats": wl["repeats"],
        "engines": len(wl["engines"]),
        "short": wl["short_prompt_tokens"],
        "rss_prompt": res.get(SBS, "rss", "prompt_tokens"),
        "rss_new": res.get(SBS, "rss", "new_tokens"),
        "ppl_windows": res.get(SBS, "ppl", "windows"),
        "ppl_seqlen": res.get(SBS, "ppl", "seqlen"),
        "table": _table(header, rows),
        "cite": res.cite(SBS),
        "py_dec": f"{py['decode_tokens_per_s']:.1f}",
        "genai_dec": f"{genai['decode_tokens_per_s']:.1f}",
        "py_vs_genai": f"{py['decode_vs_genai-int8']:.3f}",
        "cpp_word": "above" if cpp_vs_genai > 1 else "below",
        "cpp_vs_genai": f"{cpp_vs_genai:.2f}",
        "cpp_vs_llama": f"{cpp['decode_vs_llama.cpp']:.2f}",
        "py_vs_llama": f"{py['decode_vs_llama.cpp']:.2f}",
        "py_prompt_vs_genai": f"{py['prompt_vs_genai-int8']:.1f}",
        "cpp_prompt_vs_genai": f"{cpp['prompt_vs_genai-int8']:.1f}",
        "prompt_vs_llama": f"{min(pr):.1f}-{max(pr):.1f}",
        "bytes_vs_llama": f"{res.get(SBS, 'bytes', 'engines', 'moedge-py-cpu', 'bytes_vs_llama.cpp'):.2f}",
        "ppl_cpu": f"{ppl['moedge-py-cpu']['perplexity']:.3f}",
        "cpu_vs_fake": f"{(ppl['moedge-py-cpu']['perplexity'] / fake - 1) * 100:+.2f}%",
        "ppl_trt": f"{ppl['moedge-py-trt']['perplexity']:.3f}",
        "trt_vs_fake": f"{(ppl['moedge-py-trt']['perplexity'] / fake - 1) * 100:+.2f}%",
        "tie_cost": f"{(ppl['moedge-py-trt']['perplexity'] / ppl['moedge-py-untied-trt']['perplexity'] - 1) * 100:+.2f}%",
        "ppl_untied": f"{ppl['moedge-py-untied-trt']['perplexity']:.3f}",
        "py_vs_fp32": f"{ppl['moedge-py-cpu']['vs_fp32']:.3f}",
        "genai_vs_fp32": f"{ppl['genai-int8']['vs_fp32']:.3f}",
        "rot_full": _rot_full(res),
        "cpp_rss": f"{rss['moedge-cpp']['peak_rss_bytes'] / rss['llama.cpp']['peak_rss_bytes']:.2f}",
        "py_rss": f"{rss['moedge-py-cpu']['peak_rss_bytes'] / rss['llama.cpp']['peak_rss_bytes']:.2f}",
        "py_imp": f"{rss['moedge-py-cpu']['peak_rss_after_imports_bytes'] / MIB:.0f} MiB",
        "llama_imp": f"{rss['llama.cpp']['peak_rss_after_imports_bytes'] / MIB:.0f}",
        "py_load": f"{rss['moedge-py-cpu']['peak_rss_after_load_bytes'] / MIB:.0f}",
        "llama_load": f"{rss['llama.cpp']['peak_rss_after_load_bytes'] / MIB:.0f}",
        "py_extra": f"{(rss['moedge-py-cpu']['peak_rss_bytes'] - rss['moedge-py-cpu']['peak_rss_after_load_bytes']) / MIB:.0f} MiB",
        "dense_mb": f"{bar['dense_weight_bytes_per_token'] / 1e6:.1f} MB",
        "moe_mb": f"{bar['moe_weight_bytes_per_token'] / 1e6:.1f} MB",
        "dense_mb_n": f"{bar['dense_weight_bytes_per_token'] / 1e6:.1f}",
        "moe_mb_n": f"{bar['moe_weight_bytes_per_token'] / 1e6:.1f}",
        "bar": f"{bar['bar_tokens_per_s']:.1f}",
        "moe_table": _table(moe_header, moe_rows),
        "in_graph_gain": f"{bar['in_graph_over_runtime_dispatch']:.2f}",
    }


def _rot_full(res: Any) -> str:
    full = res.get(
        "calibration_smollm2-135m.json", "rows", "haq+rot-full", "eval", "wikitext2_full", "perplexity"
    )
    return f"{full / res.get('smollm2_wikitext2_pytorch.json', 'perplexity'):.3f}"


def render_cpp(res: Any) -> Values:
    """Parity and speed of the C++ runner against the Python runtime on the same bundles."""
    f = "cpp_runtime.json"
    rows = []
    for key, label in (("fp32", "FP32"), ("w8a8", "W8A8 (QDQ)")):
        r = res.get(f, "rows", key)
        prompts = r["parity"]["prompts"]
        same = sum(1 for p in prompts if p["same_ids"])
        diff = max(p["max_abs_logit_diff"] for p in prompts)
        c, p = r["speed"]["cpp"], r["speed"]["python"]
        rows.append(
            [
                label,
                f"{same} of {len(prompts)}",
                f"{diff:g}",
                f"{c['prompt_tokens_per_s']:.0f} / {p['prompt_tokens_per_s']:.0f} "
                f"({r['speed']['prompt_ratio_cpp_to_python']:.2f}x)",
                f"{c['decode_tokens_per_s']:.1f} / {p['decode_tokens_per_s']:.1f} "
                f"({r['speed']['decode_ratio_cpp_to_python']:.2f}x)",
            ]
        )
    header = ["bundle", "same greedy ids", "first-step logits, max abs diff", "prompt tok/s C++ / Python"]
    header += ["decode tok/s C++ / Python"]
    by = res.get("runtime/runtime_speed.json", "decode_ms_per_token_by_graph", "w8a8 bundle")
    return {
        "table": _table(header, rows),
        "cite": res.cite(f),
        "glue": f"{by['other']:.1f}",
        "total": f"{by['total']:.1f}",
    }


def readme_table(res: Any, policy_cells: list[dict[str, Any]]) -> str:
    """README.md's results table (between its results markers), every figure from the same JSON."""

    def ppl(model: str, row: str, key: str = "wikitext2") -> float:
        return float(res.get(f"calibration_{model}.json", "rows", row, "eval", key, "perplexity"))

    d, m = "smollm2-135m", "smollm2-135m-moe"
    fp_full = res.get("smollm2_wikitext2_pytorch.json", "perplexity")
    rot = ppl(d, "haq+rot-full", "wikitext2_full")
    bp = res.get("bundle_parity_smollm2-135m-moe.json", "rows")
    rs = res.get("runtime/runtime_speed.json", "variants")
    sp, bar = res.get(SBS, "speed", "engines"), res.get(SBS, "speed", "moe_bar")
    py, cpp = sp["moedge-py-cpu"], sp["moedge-cpp"]
    pol = {(c["profile"], c["budget_fraction"], c["policy"]): c for c in policy_cells}
    rp = res.get("rotation_parity.json", "recipes")
    nano = "jetson-orin-nano-8gb"
    full_gpu = res.get("runtime/runtime_policies.json", "full_gpu", nano, "modeled_decode_ms", "mean")
    w8 = res.get("cpp_runtime.json", "rows", "w8a8")
    diff = max(p["max_abs_logit_diff"] for p in w8["parity"]["prompts"])
    same = "same greedy ids" if w8["parity"]["all_same_ids"] else "greedy ids differ"
    genai_prompt = [py["prompt_vs_genai-int8"], cpp["prompt_vs_genai-int8"]]

    def ms(policy: str) -> str:
        return f"{pol[(nano, 0.25, policy)]['modeled_decode_ms']['mean']:.2f}"

    others = [k[2] for k in pol if k[:2] == (nano, 0.25) and k[2] not in ("haq", "cpu", "full-gpu")]
    best = min(others, key=lambda p: pol[(nano, 0.25, p)]["modeled_decode_ms"]["mean"])

    rows = [
        [
            "W8A8 (HAQ) perplexity, smollm2-135m, WikiText-2 (128 windows of 512)",
            f"{ppl(d, 'haq'):.3f} vs FP32 {ppl(d, 'fp32'):.3f} ({ppl(d, 'haq') / ppl(d, 'fp32'):.3f}x); "
            f"rtn {ppl(d, 'rtn'):.3f} ({ppl(d, 'rtn') / ppl(d, 'fp32'):.3f}x)",
            "[calibration](docs/RESULTS.md#w8a8-calibration)",
        ],
        [
            "W8A8 HAQ + `--rotate full`, smollm2-135m, full WikiText-2 test set",
            f"{rot:.3f} vs FP32 {fp_full:.3f} ({rot / fp_full:.3f}x; without rotation "
            f"{ppl(d, 'haq', 'wikitext2_full') / fp_full:.3f}x); "
            f"PTB {ppl(d, 'haq+rot-full', 'ptb') / ppl(d, 'fp32', 'ptb'):.3f}x, "
            f"C4 {ppl(d, 'haq+rot-full', 'c4') / ppl(d, 'fp32', 'c4'):.3f}x; with `--quantize-head` "
            f"{ppl(d, 'haq+rot-full+head', 'wikitext2_full') / fp_full:.3f}x",
            "[rotations](docs/RESULTS.md#rotations-issue-17)",
        ],
        [
            "rotated W8A8 bundle vs the peers, smollm2-135m, 64 WikiText-2 windows",
            f"ort-cpu bundle {rp['haq+rot-full']['bundle_x_fp32']:.4f}x FP32 (unrotated "
            f"{rp['haq']['bundle_x_fp32']:.4f}x), llama.cpp Q8_0 "
            f"{res.get('rotation_parity.json', 'llama_cpp_q8_0', 'x_fp32'):.4f}x; KL to its fake-quant model "
            f"{rp['haq+rot-full']['kl_mean']:.4f} nats; decode "
            f"{res.get('rotation_parity.json', 'decode', 'ratio_to_first', 'haq+rot-full'):.2f}x the unrotated bundle's",
            "[rotation side by side](docs/RESULTS.md#rotation-side-by-side-and-bundle-parity-issue-17)",
        ],
        [
            "W8A8 (HAQ) perplexity, smollm2-135m-moe",
            f"{ppl(m, 'haq'):.3f} vs FP32 {ppl(m, 'fp32'):.3f} ({ppl(m, 'haq') / ppl(m, 'fp32'):.3f}x)",
            "[calibration](docs/RESULTS.md#w8a8-calibration)",
        ],
        [
            "ONNX export vs PyTorch, smollm2-135m, full WikiText-2",
            f"{fp_full:.5f} in PyTorch, {res.get('smollm2_wikitext2_ort.json', 'perplexity'):.5f} in ORT",
            "[export](docs/RESULTS.md#smollm2-135m-pytorch-and-onnx-runtime-perplexity)",
        ],
        [
            "split bundle vs PyTorch, smollm2-135m-moe (240 experts)",
            f"FP32: top-1 agreement {bp['fp32']['top1_agreement']:.5f}; "
            f"W8A8: perplexity ratio {bp['w8a8']['perplexity_ratio']:.5f}",
            "[bundle parity](docs/RESULTS.md#bundle-split-parity-on-a-real-moe)",
        ],
        [
            "decode on ORT CPU, smollm2-135m-moe",
            f"W8A8 bundle {rs['w8a8 bundle']['decode_tokens_per_s']:.1f} tok/s, FP32 bundle "
            f"{rs['fp32 bundle']['decode_tokens_per_s']:.1f}, PyTorch eager FP32 "
            f"{rs['pytorch eager fp32']['decode_tokens_per_s']:.1f}",
            "[runtime speed](docs/RESULTS.md#runtime-speed-on-ort-cpu)",
        ],
        [
            "side by side, dense smollm2-135m, same ORT, 2 threads",
            f"moedge W8A8 ort-cpu target: decode {py['decode_vs_genai-int8']:.2f}x ORT GenAI int8 from Python, "
            f"{cpp['decode_vs_genai-int8']:.2f}x from C++ ({py['decode_vs_llama.cpp']:.2f}x / "
            f"{cpp['decode_vs_llama.cpp']:.2f}x llama.cpp Q8_0), prompt {min(genai_prompt):.1f}-"
            f"{max(genai_prompt):.1f}x GenAI int8, "
            f"{res.get(SBS, 'bytes', 'engines', 'moedge-py-cpu', 'bytes_vs_llama.cpp'):.2f}x the Q8_0 file's bytes; "
            f"perplexity {res.get(SBS, 'ppl', 'engines', 'moedge-py-cpu', 'vs_fp32'):.3f}x FP32 vs their "
            f"{res.get(SBS, 'ppl', 'engines', 'genai-int8', 'vs_fp32'):.3f}x; smollm2-135m-moe with "
            f"`--experts-in-graph` {bar['in_graph_over_fp32_twin']:.2f}x its FP32 twin",
            "[side by side](docs/RESULTS.md#side-by-side-with-the-peers-dense-smollm2-135m)",
        ],
        [
            "expert cache at 25% of expert bytes, Jetson Orin Nano (modeled; every policy tuned per cell)",
            f"haq {ms('haq')} ms/token, best other policy ({best}) {ms(best)}, lru {ms('lru')}, all on CPU "
            f"{ms('cpu')}, full GPU {full_gpu:.2f}",
            "[policies](docs/RESULTS.md#runtime-expert-cache-policies-on-real-routing-traces-modeled)",
        ],
        [
            "C++ `moedge-run` vs the Python runtime, W8A8 MoE bundle",
            f"{same}, logits max abs diff {diff:g}; decode {w8['speed']['cpp']['decode_tokens_per_s']:.1f} / "
            f"{w8['speed']['python']['decode_tokens_per_s']:.1f} tok/s "
            f"({w8['speed']['decode_ratio_cpp_to_python']:.2f}x)",
            "[C++](docs/RESULTS.md#c-runner-vs-the-python-runtime)",
        ],
    ]
    sources = "Generated by `benchmarks/results_doc.py` from `benchmarks/results/` (each figure's JSON and commit: docs/RESULTS.md)."
    return _table(["what", "figure", "details"], rows) + "\n\n" + sources + "\n"


def render_rotation_parity(res: Any) -> Values:
    """Issue 17's accuracy rows on one set of windows, bundle parity against its noise floor, decode cost."""
    f = "rotation_parity.json"
    fp = res.get(f, "fp32", "perplexity")
    recipes = res.get(f, "recipes")
    labels = {"haq": "HAQ, no rotation", "haq+rot-full": "HAQ + `--rotate full`"}
    rows = [["FP32 (PyTorch)", f"{fp:.3f}", "1.000"]]
    for key, r in recipes.items():
        name = labels.get(key, key)
        rows.append(
            [
                f"{name}: fake-quant model",
                f"{r['fake_quant_perplexity']:.3f}",
                f"{r['fake_quant_x_fp32']:.4f}",
            ]
        )
        rows.append([f"{name}: ort-cpu bundle", f"{r['bundle_perplexity']:.3f}", f"{r['bundle_x_fp32']:.4f}"])
    dyn = res.get(f, "dynamic_w8a8")
    rows.append(
        [
            "dynamic per-token W8A8, RTN weights (not expressible in TensorRT explicit quantization)",
            f"{dyn['perplexity']:.3f}",
            f"{dyn['x_fp32']:.4f}",
        ]
    )
    llama = res.get(f, "llama_cpp_q8_0")
    rows.append(
        ["llama.cpp Q8_0 (side_by_side.json)", f"{llama['perplexity']:.3f}", f"{llama['x_fp32']:.4f}"]
    )
    parity = []
    for key, r in recipes.items():
        parity.append(
            [
                labels.get(key, key),
                f"{r['kl_mean']:.4f}",
                f"{r['kl_noise_floor']:.4f}",
                f"{r['kl_bar']:.4f}",
                "yes" if r["kl_ok"] else "no",
                f"{r['bundle_over_fake_quant']:.4f}",
                f"{r['top1_agreement']:.4f}",
                f"{r['top1_noise_floor']:.4f}",
            ]
        )
    dec = res.get(f, "decode")
    first = next(iter(dec["median_ms_per_token"]))
    decode = [
        [labels.get(k, k), f"{ms:.2f}", f"{dec['ratio_to_first'][k]:.3f}"]
        for k, ms in dec["median_ms_per_token"].items()
    ]
    return {
        "threads": res.doc(f)["environment"]["threads"],
        "windows": res.get(f, "windows"),
        "positions": f"{res.get(f, 'positions'):,}",
        "same": "the same FP32 perplexity there, within 1e-5"
        if llama["same_windows_as_here"]
        else "WARNING: that run's FP32 differs from this one's",
        "table": _table(["model", "perplexity", "x FP32"], rows),
        "cite": res.cite(f, SBS),
        "eps": f"{res.get(f, 'eps'):g}",
        "parity": _table(
            [
                "recipe",
                "KL (nats)",
                "noise floor",
                "bar",
                "met",
                "ppl bundle / fake-quant",
                "top-1 agreement",
                "top-1 noise floor",
            ],
            parity,
        ),
        "new": dec["new_tokens"],
        "prompt": dec["prompt_tokens"],
        "rounds": dec["rounds"],
        "decode": _table(["bundle", "decode ms/token", f"x {labels.get(first, first)}"], decode),
        "rot_bundle": f"{recipes['haq+rot-full']['bundle_x_fp32']:.4f}",
        "haq_bundle": f"{recipes['haq']['bundle_x_fp32']:.4f}",
        "llama": f"{llama['x_fp32']:.4f}",
        "dyn": f"{dyn['x_fp32']:.4f}",
        "rot_decode": f"{dec['ratio_to_first']['haq+rot-full']:.3f}",
        **{
            f"{k}_{name}": value
            for k, key in (("rot", "haq+rot-full"), ("haq", "haq"))
            for name, value in (
                ("kl", f"{recipes[key]['kl_mean']:.4f}"),
                ("floor", f"{recipes[key]['kl_noise_floor']:.4f}"),
                ("verdict", "bar met" if recipes[key]["kl_ok"] else "bar not met"),
            )
        },
    }
