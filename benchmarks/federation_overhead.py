"""Federation overhead: federated vs centralized training on the same data and epochs.

Both runs use one recipe; the centralized run is the same code with one client holding the
pooled training data (``federation.mode=centralized``), so every sample is seen
``rounds × local_epochs`` times in both. The ratio of wall-clock times is the cost of
federating (messaging, per-round Trainers, per-client evaluation, smaller batches per site)
on this machine.

Usage::

    python benchmarks/federation_overhead.py                       # leukemia_demo, as shipped
    python benchmarks/federation_overhead.py federation.rounds=5   # any override
    python benchmarks/federation_overhead.py --out benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from runner import fit_variant

DEFAULT_OUT = Path(__file__).parent / "results" / "federation_overhead.json"


METRICS = ("test/accuracy", "test/auroc", "test/stage_macro_f1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="leukemia_demo")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        federated = fit_variant(args.recipe, Path(tmp) / "federated", args.overrides, METRICS)
        central_overrides = [*args.overrides, "federation.mode=centralized"]
        centralized = fit_variant(args.recipe, Path(tmp) / "central", central_overrides, METRICS)
    for run in (federated, centralized):
        if run["exit_code"] != 0:
            raise SystemExit(f"{run['command']} failed with exit code {run['exit_code']}")
    result = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "federated": federated,
        "centralized": centralized,
        "overhead_ratio_wall": federated["seconds"] / centralized["seconds"],
        "overhead_ratio_rounds": federated["round_seconds_total"] / centralized["round_seconds_total"],
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "cuda": torch.cuda.is_available(),
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
