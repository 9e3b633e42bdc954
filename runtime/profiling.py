"""``moedge profile``: routing statistics of a bundle over real text, and a placement plan tuned from them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError
from moedge.formats.manifest import MANIFEST_FILE, Manifest, read_manifest, sha256_file
from moedge.formats.placement_plan import write_plan
from moedge.formats.routing import ROUTING_FILE, RoutingStats, read_routing
from moedge.paths import atomic_file, bundle_root, new_temp_file, refuse_inside_bundle, remove_stale_temps
from moedge.runtime.bundle_runner import BundleRunner
from moedge.runtime.costs import ModelCosts, parse_budget
from moedge.runtime.policies import POLICIES
from moedge.runtime.profiles import load_profile
from moedge.runtime.simulate import DecodeTrace, record_trace, tune_haq

log = logging.getLogger(__name__)


PLAN_KEY = "plan"
"""``manifest.extra`` key naming the placement plan that ``--update-bundle`` wrote into the bundle."""


def update_bundle_files(
    bundle: str | Path,
    writers: dict[str, Callable[[Path], None]],
    *,
    routing: str | None = None,
    plan: str | None = None,
) -> None:
    """Add or replace files inside a bundle and list them in its manifest, never leaving it half-updated.

    ``writers`` maps a bundle-relative path to a function that writes that file's content to the
    path it is given. Each file is written to a temporary sibling, then the new manifest (those files'
    sha256 and bytes in ``files``; ``routing``, and ``plan`` under ``extra``, when given) to another;
    the files are renamed into place and ``manifest.json`` is replaced last. Only new files, the
    routing statistics and a plan written this way before are replaced (``check_bundle_target``).
    """
    folder = Path(bundle)
    manifest = read_manifest(folder)
    for rel in writers:
        check_bundle_target(folder, rel, manifest)
    temps: dict[str, Path] = {}
    try:
        for rel, write in writers.items():
            target = folder / rel
            remove_stale_temps(target)
            temps[rel] = new_temp_file(target)
            write(temps[rel])
        files = dict(manifest.files)
        for rel, tmp in temps.items():
            files[rel] = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
        extra = dict(manifest.extra)
        if plan is not None:
            extra[PLAN_KEY] = plan
        updated = dataclasses.replace(manifest, files=files, routing=routing or manifest.routing, extra=extra)
        remove_stale_temps(folder / MANIFEST_FILE)
        manifest_tmp = new_temp_file(folder / MANIFEST_FILE)
        temps[MANIFEST_FILE] = manifest_tmp
        manifest_tmp.write_text(updated.to_json())
        for tmp in temps.values():
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        for rel, tmp in list(temps.items()):
            if rel != MANIFEST_FILE:
                os.replace(tmp, folder / rel)
                del temps[rel]
        os.replace(manifest_tmp, folder / MANIFEST_FILE)
        del temps[MANIFEST_FILE]
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def check_bundle_target(bundle: Path, rel: str, manifest: Manifest | None = None) -> None:
    """Raise one clear line unless ``--update-bundle`` may write the bundle-relative path ``rel``.

    Allowed: a path the manifest does not list yet, its routing statistics file and the plan
    written there before; never ``manifest.json``, a graph, its weights or the tokenizer.
    """
    manifest = manifest or read_manifest(bundle)
    replaceable = {manifest.routing, manifest.extra.get(PLAN_KEY), ROUTING_FILE} - {None}
    if rel == MANIFEST_FILE or (rel in manifest.files and rel not in replaceable):
        raise MoedgeError(
            f"{bundle / rel} is one of the bundle's own files: --update-bundle writes only routing.json "
            "and a new plan file; choose another --plan path"
        )


def _npz_path(path: str | Path) -> Path:
    """The file numpy writes for ``path`` (it appends ``.npz`` when missing)."""
    out = Path(path)
    return out if out.suffix == ".npz" else out.with_name(out.name + ".npz")


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
    output: str | Path | None = None,
    update_bundle: bool = False,
    merge: list[Path] | None = None,
    plan: str | Path | None = None,
    gpu_budget: str | float | None = "25%",
    profile: str = "rtx4090-pcie4",
    trace: str | Path | None = None,
    threads: int | None = None,
) -> list[str]:
    """Run ``tokens`` of ``text`` through the bundle, write ``routing.json`` (merged with earlier workloads)
    and, with ``plan``, a haq placement tuned for ``gpu_budget`` on ``profile``; returns a report.

    ``output``, ``plan`` and ``trace`` are written atomically and never inside a bundle; with
    ``update_bundle`` the routing statistics go into the bundle itself (``routing.json``, listed in
    its manifest, which is replaced last), and so does ``plan`` when it names a path inside the
    bundle. Every output path is checked before the (minutes-long) run.
    """
    folder = Path(bundle)
    root = folder.expanduser().resolve()
    trace_path = None if trace is None else _npz_path(trace)
    plan_rel = _check_outputs(root, output, update_bundle, plan, trace_path)
    runner = BundleRunner(folder, intra_op_threads=threads)
    ids = text_token_ids(folder, text, tokens)
    recorded = _record(runner, ids)
    stats = recorded.stats()
    for other in merge or []:
        stats = stats.merge(read_routing(other))
    routing_text = json.dumps(stats.to_dict(), indent=1) + "\n"
    if output is not None:
        with atomic_file(output) as tmp:
            tmp.write_text(routing_text)
    destinations = [str(p) for p in (output, root / ROUTING_FILE if update_bundle else None) if p is not None]
    recall = recorded.prefetch_recall(stats.top_k)
    report = [
        f"routing statistics of {len(ids)} tokens of {text} ({stats.tokens} with merged workloads) -> "
        + ", ".join(destinations),
        f"speculative gate (next layer's router on this layer's MoE input) recalls {recall:.3f} of the next "
        f"layer's top-{stats.top_k}",
    ]
    if trace_path is not None:
        with atomic_file(trace_path, suffix=".npz") as tmp:
            recorded.save(tmp)
        report.append(f"trace -> {trace_path}")
    writers: dict[str, Callable[[Path], None]] = {}
    if update_bundle:

        def routing_writer(path: Path) -> None:
            path.write_text(routing_text)

        writers[ROUTING_FILE] = routing_writer
    if plan is not None:
        source = {"bundle": str(folder), "text": text, "tokens": len(ids)}
        plan_writer, line = _tuned_plan(runner, recorded, stats, gpu_budget, profile, source, plan)
        if plan_rel is not None:
            writers[plan_rel] = plan_writer
        else:
            with atomic_file(plan) as tmp:
                plan_writer(tmp)
        report.append(line)
    if update_bundle:
        update_bundle_files(root, writers, routing=ROUTING_FILE, plan=plan_rel)
        report.append(f"bundle {root}: manifest.json lists {', '.join(writers)}")
    return report


def _check_outputs(
    root: Path, output: str | Path | None, update_bundle: bool, plan: str | Path | None, trace: Path | None
) -> str | None:
    """Refuse, before the run, every output path a profile may not write; the plan's path inside the
    bundle (with ``update_bundle``), else None."""
    if output is None and not update_bundle:
        raise MoedgeError(
            "give -o FILE for the routing statistics, or --update-bundle to write them into the bundle"
        )
    if output is not None:
        refuse_inside_bundle(output, flag="-o")
    if trace is not None:
        refuse_inside_bundle(trace, flag="--trace")
    plan_rel: str | None = None
    if plan is not None:
        if update_bundle and bundle_root(plan) == root:
            plan_rel = Path(plan).expanduser().resolve().relative_to(root).as_posix()
            if plan_rel == ROUTING_FILE:
                raise MoedgeError(
                    f"--plan {plan} is where --update-bundle writes routing.json: name the plan otherwise"
                )
            check_bundle_target(root, plan_rel)
        else:
            refuse_inside_bundle(plan, flag="--plan")
    if update_bundle and not os.access(root, os.W_OK):
        raise MoedgeError(f"bundle {root} is not writable: --update-bundle needs write access to it")
    return plan_rel


def _record(runner: BundleRunner, ids: list[int]) -> DecodeTrace:
    """The routing trace of ``ids`` decoded through ``runner``, with a progress bar."""
    from tqdm import tqdm

    bar = tqdm(desc="profiling routing", unit="window", disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        return record_trace(runner, ids, progress=progress)
    finally:
        bar.close()


def _tuned_plan(
    runner: BundleRunner,
    recorded: DecodeTrace,
    stats: RoutingStats,
    gpu_budget: str | float | None,
    profile: str,
    source: dict[str, Any],
    plan: str | Path,
) -> tuple[Callable[[Path], None], str]:
    """A haq placement tuned on the recorded trace: its writer and the report line."""
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
    source = {**source, "profile": hw.name}

    def plan_writer(path: Path) -> None:
        write_plan(path, pinned, budget=budget, policy="haq", settings=settings, source=source)

    line = (
        f"plan -> {plan}: {len(pinned)} experts pinned of a {budget / 2**20:.1f} MiB budget on {hw.name}, "
        f"settings {settings}; modeled on the profiling text: {summary['modeled_decode_ms']['mean']:.3f} "
        f"ms/token, hit rate {summary['hit_rate']:.3f}"
    )
    return plan_writer, line
