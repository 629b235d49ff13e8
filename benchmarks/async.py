"""Synchronous vs buffered asynchronous rounds on the virtual clock, with slow and vanishing clients.

Both runs use ``leukemia_demo`` with ``federation.client_speed={name: lognormal, sigma: 1.0}`` and
``federation.dropout=0.1`` (the same seeded speeds and dropout draws). The synchronous run waits
for its slowest client each round; the asynchronous one (``federation.mode=async``,
``buffer_size=3``, exponential staleness weights) makes a new global model every 3 updates. The
asynchronous run gets the same number of client updates in total (``rounds · num_clients /
buffer_size`` versions) and validates on every client every ``--evaluate-every`` versions.

Reported: the sync run's final test accuracy and virtual time; the first evaluated async version
whose test accuracy is within 1 point of it, and its virtual time as a fraction of the sync run's
(**target: ≤ 0.6**); both curves (accuracy against virtual time), staleness and drops; in JSON.

Usage::

    python benchmarks/async.py                                   # the full comparison
    python benchmarks/async.py --rounds 3 --n 400 --out /tmp/async.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from runner import fit_variant  # benchmarks/runner.py (scripts run from benchmarks/)

from fedvlm.config import load_config
from fedvlm.federation.clock import build_clock
from fedvlm.runs import read_metrics

HETEROGENEITY = ["federation.client_speed={name: lognormal, sigma: 1.0}", "federation.dropout=0.1"]
METRIC = "test/accuracy"
TOLERANCE = 0.01


def curve(run_dir: Path) -> list[dict[str, Any]]:
    """``(round, virtual_time, test accuracy)`` of every evaluated row, plus staleness and drops."""
    keys = ("round", "virtual_time", METRIC, "staleness_mean", "staleness_max", "dropped_stale", "vanished")
    return [{k: row.get(k) for k in keys} for row in read_metrics(run_dir) if METRIC in row]


def predicted_versions(cfg: Any, sync_run: Path, budget: float, buffer_size: int) -> int:
    """Versions the async run makes in ``budget`` virtual time: every client busy, each finishing
    ``budget / d_c`` tasks (``d_c`` from the run's seeded speeds and the sizes the sync run saw),
    less the vanished ones. Sets the learning-rate schedule's length like the sync run's."""
    sizes = {
        int(pid): c["num_examples"]
        for row in read_metrics(sync_run)
        for pid, c in row["clients"].items()
        if "num_examples" in c
    }
    clock = build_clock(cfg.federation, sizes, int(cfg.trainer.local_epochs), int(cfg.seed))
    updates = sum(budget / clock.duration(pid) for pid in sizes) * (1 - float(cfg.federation.dropout))
    return max(1, round(updates / buffer_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="leukemia_demo")
    parser.add_argument("--rounds", type=int, default=None, help="sync rounds (default: the recipe's)")
    parser.add_argument("--buffer-size", type=int, default=3)
    parser.add_argument("--lam", type=float, default=0.5, help="λ of the exponential staleness weights (Eq. 31)")
    parser.add_argument("--evaluate-every", type=int, default=2, help="async versions between evaluations")
    parser.add_argument("--n", type=int, default=None, help="data.synthetic.n (default: the recipe's)")
    parser.add_argument("--runs", type=Path, default=Path("runs/async"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/async.json"))
    parser.add_argument("--sync-run", type=Path, default=None, help="reuse this finished sync run directory")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="give the async run this fraction of the sync run's virtual time (federation.max_virtual_time), "
        "with as many versions as the clock predicts in it; default: the sync run's number of updates",
    )
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both runs")
    args = parser.parse_args()
    common = [*HETEROGENEITY, *args.overrides]
    common += [f"data.synthetic.n={args.n}"] if args.n else []
    cfg = load_config(args.recipe, [*common, *([f"federation.rounds={args.rounds}"] if args.rounds else [])])
    rounds, clients = int(cfg.federation.rounds), int(cfg.federation.num_clients)
    per_round = int(cfg.federation.clients_per_round) or clients
    versions = max(1, round(rounds * per_round / args.buffer_size))  # the same client updates in total
    stamp = time.strftime("%Y%m%d-%H%M%S")
    variants = {
        "sync": [*common, f"federation.rounds={rounds}"],
        "async": [
            *common,
            "federation.mode=async",
            f"federation.buffer_size={args.buffer_size}",
            f"federation.staleness={{name: exponential, lam: {args.lam}}}",
            f"federation.rounds={versions}",
            f"federation.evaluate_every={args.evaluate_every}",
        ],
    }
    results: dict[str, Any] = {}
    for name, overrides in variants.items():
        if name == "async" and args.time_budget is not None:
            budget = args.time_budget * results["sync"]["virtual_time"]
            versions = predicted_versions(cfg, Path(results["sync"]["run_dir"]), budget, args.buffer_size)
            overrides = [*overrides, f"federation.rounds={versions}", f"federation.max_virtual_time={budget}"]
        out = args.runs / f"{args.recipe}-{name}-{stamp}"
        if name == "sync" and args.sync_run is not None:  # measured before, with the same overrides
            last = read_metrics(args.sync_run)[-1]
            result = {"run_dir": str(args.sync_run), "exit_code": 0, METRIC: last[METRIC]}
            result.update({"virtual_time": last["virtual_time"], "reused": True, "curve": curve(args.sync_run)})
            results[name] = result
            continue
        result = fit_variant(args.recipe, out, overrides, (METRIC, "virtual_time"))
        if result["exit_code"] == 0:
            result["curve"] = curve(out)
        results[name] = result
        print(json.dumps({name: {k: v for k, v in result.items() if k != "curve"}}, indent=1))
    summary: dict[str, Any] = {}
    sync, asynchronous = results["sync"], results["async"]
    if sync["exit_code"] == 0 and asynchronous["exit_code"] == 0:
        goal = sync[METRIC] - TOLERANCE
        reached = next((point for point in asynchronous["curve"] if point[METRIC] >= goal), None)
        summary = {
            "sync_final_accuracy": sync[METRIC],
            "sync_virtual_time": sync["virtual_time"],
            "async_final_accuracy": asynchronous[METRIC],
            "async_virtual_time": asynchronous["virtual_time"],
            "async_reaches_sync_within_1pt": reached,
            "time_ratio": round(reached["virtual_time"] / sync["virtual_time"], 3) if reached else None,
            "target_time_ratio": 0.6,
        }
        summary["target_met"] = summary["time_ratio"] is not None and summary["time_ratio"] <= 0.6
        print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": args.recipe, "summary": summary, "runs": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
