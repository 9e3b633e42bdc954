"""``moedge profile``: routing statistics of a bundle over real text, and a placement plan tuned from them."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from moedge._errors import MoedgeError
from moedge.runtime.bundle_runner import BundleRunner
from moedge.runtime.placement import write_plan
from moedge.runtime.profiles import load_profile
from moedge.runtime.routing import read_routing
from moedge.runtime.scheduler import POLICIES, ModelCosts, parse_budget
from moedge.runtime.simulate import DecodeTrace, record_trace, tune_haq

log = logging.getLogger(__name__)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def text_token_ids(bundle: Path, text: str, tokens: int) -> list[int]:
    """The first ``tokens`` token ids of a named text (or a text file) through the bundle's tokenizer."""
    from tokenizers import Tokenizer

    from moedge.datasets import load_text

    tokenizer_file = bundle / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise MoedgeError(f"{bundle} has no tokenizer.json: profile a bundle made by `moedge split`")
    body = load_text(text).text
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(body[: max(tokens * 12, 10_000)]).ids[:tokens]
    if len(ids) < 16:
        raise MoedgeError(f"text {text!r} gives only {len(ids)} tokens: profile on a longer text")
    return list(ids)


def profile_bundle(
    bundle: str | Path,
    *,
    text: str = "c4",
    tokens: int = 4096,
    output: str | Path,
    merge: list[Path] | None = None,
    plan: str | Path | None = None,
    gpu_budget: str | float | None = "25%",
    profile: str = "rtx4090-pcie4",
    trace: str | Path | None = None,
    threads: int | None = None,
) -> list[str]:
    """Run ``tokens`` of ``text`` through the bundle, write ``routing.json`` (merged with earlier workloads)
    and, with ``plan``, a haq placement tuned for ``gpu_budget`` on ``profile``; returns a report."""
    from tqdm import tqdm

    folder = Path(bundle)
    runner = BundleRunner(folder, intra_op_threads=threads)
    ids = text_token_ids(folder, text, tokens)
    bar = tqdm(desc="profiling routing", unit="window", disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    recorded: DecodeTrace = record_trace(runner, ids, progress=progress)
    bar.close()
    stats = recorded.stats()
    for other in merge or []:
        stats = stats.merge(read_routing(other))
    _write_atomic(Path(output), json.dumps(stats.to_dict(), indent=1) + "\n")
    recall = recorded.prefetch_recall(stats.top_k)
    report = [
        f"routing statistics of {len(ids)} tokens of {text} ({stats.tokens} with merged workloads) -> {output}",
        f"speculative gate (next layer's router on this layer's MoE input) recalls {recall:.3f} of the next "
        f"layer's top-{stats.top_k}",
    ]
    if trace is not None:
        recorded.save(trace)
        report.append(f"trace -> {trace}")
    if plan is not None:
        costs = ModelCosts.from_manifest(runner.manifest)
        budget = parse_budget(gpu_budget, costs)
        hw = load_profile(profile)
        policy, summary = tune_haq(recorded, costs, budget, hw, base=POLICIES["haq"], stats=stats)
        pinned = [(int(a), int(b)) for a, b in summary["plan"]]
        settings = {
            "static_fraction": policy.static_fraction,
            "prefetch": policy.prefetch,
            "prefetch_share": policy.prefetch_share,
            "path_fraction": policy.path_fraction,
            "topup": policy.topup,
        }
        source = {"bundle": str(folder), "text": text, "tokens": len(ids), "profile": hw.name}
        write_plan(plan, pinned, budget=budget, policy="haq", settings=settings, source=source)
        report.append(
            f"plan -> {plan}: {len(pinned)} experts pinned of a {budget / 2**20:.1f} MiB budget on {hw.name}, "
            f"settings {settings}; modeled on the profiling text: {summary['modeled_decode_ms']['mean']:.3f} "
            f"ms/token, hit rate {summary['hit_rate']:.3f}"
        )
    return report
