"""Privacy–utility trade-off of DP-SGD on the leukemia demo: σ → (ε, accuracy, AUROC, stage F1).

``σ = 0`` is the non-private reference (``privacy.dp=false``: no clipping, no noise, ε = ∞);
every other σ trains each client with Opacus DP-SGD (``privacy.dp=true``,
``privacy.noise_multiplier=σ``, per-sample clipping ``privacy.max_grad_norm``, Poisson
sampling) and reports the largest client's cumulative ε at ``privacy.delta`` after the last round.

Usage::

    python benchmarks/privacy_utility.py                          # σ ∈ {0, 0.5, 1, 1.5}, the recipe's rounds
    python benchmarks/privacy_utility.py --rounds 8 --sigmas 0 1  # shorter / fewer rows
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from runner import fit_variant  # benchmarks/runner.py (scripts run from benchmarks/)

METRICS = ("privacy/epsilon_max", "test/accuracy", "test/auroc", "test/stage_macro_f1")


def sigma_overrides(sigma: float) -> list[str]:
    """The overrides that train with DP-SGD at noise multiplier σ (σ = 0: without DP)."""
    if sigma == 0:
        return ["privacy.dp=false"]
    return ["privacy.dp=true", f"privacy.noise_multiplier={sigma}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="leukemia_demo")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    parser.add_argument("--rounds", type=int, help="federation.rounds (default: the recipe's)")
    parser.add_argument("--runs-dir", type=Path, help="where the runs go (default runs/privacy-<time>)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "privacy_utility.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for every run")
    args = parser.parse_args()

    runs_dir = args.runs_dir or Path("runs") / f"privacy-{time.strftime('%Y%m%d-%H%M%S')}"
    common = [*([f"federation.rounds={args.rounds}"] if args.rounds else []), *args.overrides]
    rows = []
    for sigma in args.sigmas:
        result = fit_variant(args.recipe, runs_dir / f"sigma_{sigma:g}", [*common, *sigma_overrides(sigma)], METRICS)
        result["sigma"] = sigma
        if sigma == 0 and result["exit_code"] == 0:
            result["privacy/epsilon_max"] = math.inf
        rows.append(result)
        print(json.dumps(result), flush=True)
    report = {"recipe": args.recipe, "common_overrides": common, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
