"""Cost of secure aggregation: round time and traffic with SecAgg+ vs plain FedAvg, same recipe.

Both runs train the same recipe, data, seed and rounds; the secure run adds
``federation.secure_aggregation.enabled=true`` (four message exchanges per round, key agreement,
Shamir shares, masking and unmasking of every weight). Round time includes local training, so
the ratio is what a federation pays end to end; the time SecAgg+ itself adds is the difference.

Usage::

    python benchmarks/secagg_cost.py                                 # leukemia_demo, 3 rounds
    python benchmarks/secagg_cost.py --recipe cxr_demo --rounds 2
    python benchmarks/secagg_cost.py federation.clients_per_round=5  # any override
    python benchmarks/secagg_cost.py --recipe cxr_demo --rounds 2 model.adapter.name=lora  # adapters only travel
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from runner import fit_variant  # benchmarks/runner.py (scripts run from benchmarks/)

from fedvlm.runs import read_metrics

METRICS = ("test/accuracy", "test/auroc", "test/macro_auroc", "num_clients")


def measure(recipe: str, out: Path, overrides: list[str]) -> dict[str, object]:
    result = fit_variant(recipe, out, overrides, METRICS)
    if result["exit_code"] != 0:
        raise SystemExit(f"{result['command']} failed with exit code {result['exit_code']}")
    rows = read_metrics(out)
    result["round_seconds"] = [round(r["round_seconds"], 2) for r in rows]
    result["round_seconds_median"] = statistics.median(r["round_seconds"] for r in rows)
    result["bytes_per_round"] = statistics.mean(r["bytes_sent"] + r["bytes_received"] for r in rows)
    # what one client sends in a round (under SecAgg+: its replies to all four stages)
    result["uplink_per_client_round"] = statistics.mean(r["bytes_received"] / r["num_clients"] for r in rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="leukemia_demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secagg_cost.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    common = [f"federation.rounds={args.rounds}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        plain = measure(args.recipe, Path(tmp) / "plain", common)
        secure = measure(args.recipe, Path(tmp) / "secure", [*common, "federation.secure_aggregation.enabled=true"])
    report = {
        "recipe": args.recipe,
        "overrides": common,
        "plain": plain,
        "secagg": secure,
        "round_time_ratio": float(secure["round_seconds_median"]) / float(plain["round_seconds_median"]),  # type: ignore[arg-type]
        "traffic_ratio": float(secure["bytes_per_round"]) / float(plain["bytes_per_round"]),  # type: ignore[arg-type]
        "uplink_ratio": float(secure["uplink_per_client_round"]) / float(plain["uplink_per_client_round"]),  # type: ignore[arg-type]
        "machine": {
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cuda": torch.cuda.is_available(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("round_time_ratio", "traffic_ratio", "uplink_ratio")}))


if __name__ == "__main__":
    main()
