"""Byzantine robustness: the leukemia demo, clean and with sign-flipping clients, per strategy.

Variants (all on ``leukemia_demo``, 10 clients):

- ``clean_fedavg``: no attack, FedAvg (the reference);
- ``signflip_<strategy>``: ``⌊fraction·num_clients⌋`` clients (drawn with the run's seed) send
  ``w − s·Δ`` (``federation.byzantine.attack=sign_flip``) under ``fedavg``, ``trimmed_mean``
  (β = fraction), ``median`` and ``krum`` (f = number of attackers).

For each variant the last round's test accuracy, AUROC and stage macro-F1 (and its
``update_norm``) go to a JSON file, with the exact ``fedvlm fit`` command that produced the run.

Usage::

    python benchmarks/byzantine.py                                 # the full demo (20 rounds, n=5400)
    python benchmarks/byzantine.py --rounds 2 --n 400 --out /tmp/byzantine.json   # a smoke run
    python benchmarks/byzantine.py --variants clean_fedavg signflip_median trainer.local_epochs=1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from runner import fit_variant  # benchmarks/runner.py (scripts run from benchmarks/)

from fedvlm.config import load_config
from fedvlm.federation.byzantine import byzantine_clients
from fedvlm.runs import RunLayout

ROBUST = ("fedavg", "trimmed_mean", "median", "krum")
VARIANTS = ("clean_fedavg", *(f"signflip_{strategy}" for strategy in ROBUST))
METRICS = ("test/accuracy", "test/auroc", "test/stage_macro_f1", "update_norm")
NUM_CLIENTS = 10


def variant_overrides(variant: str, fraction: float, scale: float) -> list[str]:
    """The config overrides that make ``variant`` out of the demo recipe."""
    if variant == "clean_fedavg":
        return ["federation.strategy=fedavg"]
    strategy = variant.removeprefix("signflip_")
    attackers = math.floor(fraction * NUM_CLIENTS + 1e-9)
    options = {"trimmed_mean": f"trim_fraction: {fraction}", "krum": f"byzantine_f: {attackers}"}.get(strategy)
    overrides = [
        f"federation.strategy={{name: {strategy}, {options}}}" if options else f"federation.strategy={strategy}",
        f"federation.byzantine.attack={{name: sign_flip, scale: {scale}}}",
        f"federation.byzantine.fraction={fraction}",
    ]
    return overrides


def run_variant(variant: str, runs_dir: Path, common: list[str], fraction: float, scale: float) -> dict[str, object]:
    out = runs_dir / variant
    result = fit_variant("leukemia_demo", out, [*common, *variant_overrides(variant, fraction, scale)], METRICS)
    if result["exit_code"] == 0:
        cfg = load_config(RunLayout(out).config)
        result["byzantine_clients"] = byzantine_clients(cfg.federation, int(cfg.seed))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="federation.rounds (default: the recipe's 20)")
    parser.add_argument("--n", type=int, help="data.synthetic.n (default: the recipe's 5400)")
    parser.add_argument("--fraction", type=float, default=0.2, help="fraction of sign-flipping clients")
    parser.add_argument("--scale", type=float, default=10.0, help="sign-flip scale s")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--runs-dir", type=Path, help="where the runs go (default runs/byzantine-<time>)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "byzantine.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for every variant")
    args = parser.parse_args()

    runs_dir = args.runs_dir or Path("runs") / f"byzantine-{time.strftime('%Y%m%d-%H%M%S')}"
    common = [f"federation.num_clients={NUM_CLIENTS}"]
    if args.rounds is not None:
        common.append(f"federation.rounds={args.rounds}")
    if args.n is not None:
        common.append(f"data.synthetic.n={args.n}")
    common.extend(args.overrides)

    results = {}
    for variant in args.variants:
        results[variant] = run_variant(variant, runs_dir, common, args.fraction, args.scale)
        print(json.dumps({variant: results[variant]}), flush=True)
    report = {
        "recipe": "leukemia_demo",
        "fraction": args.fraction,
        "scale": args.scale,
        "common_overrides": common,
        "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
