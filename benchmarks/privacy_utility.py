"""Privacy–utility trade-off of DP-SGD on a leukemia recipe: σ → (ε, accuracy, AUROC, stage F1).

``σ = 0`` is the non-private reference (``privacy.dp=false``: no clipping, no noise, ε = ∞);
every other σ trains each client with Opacus DP-SGD (``privacy.dp=true``,
``privacy.noise_multiplier=σ``, per-sample clipping ``privacy.max_grad_norm``, Poisson
sampling) and reports the largest client's cumulative ε at ``privacy.delta`` after the last round.
``--target-epsilons E ...`` adds rows where each client's σ is calibrated so that the whole run
ends at ε ≤ E (``privacy.target_epsilon``). ``--plot`` draws accuracy, AUROC and stage F1 against ε.

Usage::

    python benchmarks/privacy_utility.py                          # leukemia_demo, σ ∈ {0, 0.5, 1, 1.5}
    python benchmarks/privacy_utility.py --rounds 8 --sigmas 0 1  # shorter / fewer rows
    python benchmarks/privacy_utility.py --recipe leukemia_pretrained --target-epsilons 8 \
        --out benchmarks/results/privacy_utility_pretrained.json --plot docs/img/privacy_utility_pretrained.png
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
    parser.add_argument("--target-epsilons", type=float, nargs="*", default=[], help="privacy.target_epsilon rows")
    parser.add_argument("--plot", type=Path, help="PNG of accuracy, AUROC and stage F1 against ε")
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
    for target in args.target_epsilons:
        overrides = [*common, "privacy.dp=true", f"privacy.target_epsilon={target}"]
        result = fit_variant(args.recipe, runs_dir / f"target_epsilon_{target:g}", overrides, METRICS)
        result["target_epsilon"] = target
        rows.append(result)
        print(json.dumps(result), flush=True)
    report = {"recipe": args.recipe, "common_overrides": common, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.plot:
        plot(rows, args.recipe, args.plot)
        print(f"wrote {args.plot}")


def plot(rows: list[dict], recipe: str, path: Path) -> None:
    """Accuracy, AUROC and stage macro-F1 against the final ε (the non-private run as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"test/accuracy": "accuracy", "test/auroc": "AUROC", "test/stage_macro_f1": "stage macro-F1"}
    private = sorted(
        (r for r in rows if r.get("exit_code") == 0 and math.isfinite(r["privacy/epsilon_max"])),
        key=lambda r: r["privacy/epsilon_max"],
    )
    reference = next((r for r in rows if r.get("sigma") == 0 and r.get("exit_code") == 0), None)
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for (key, label), color in zip(labels.items(), ("C0", "C1", "C2"), strict=True):
        axis.plot(
            [r["privacy/epsilon_max"] for r in private], [r[key] for r in private], "o-", color=color, label=label
        )
        if reference is not None:
            axis.axhline(reference[key], color=color, linestyle=":", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("ε after the last round (δ = privacy.delta); dotted: without DP")
    axis.set_ylabel("test metric (merged over sites)")
    axis.set_title(f"DP-SGD privacy–utility, {recipe}")
    axis.legend(loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
