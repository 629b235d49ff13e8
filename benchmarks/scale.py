"""What a round costs as the registered population grows while the sampled clients stay the same.

For each population (default 100, 1,000 and 10,000 registered clients) ``leukemia_demo`` runs
with 20 clients sampled per round for training and 20 for federated evaluation, the same data
per client (IID, ``--per-client`` cases each: ~16 training cases), and ``--rounds`` rounds.
Reported per population:

* ``round_seconds``: the median round time over the rounds that are neither the first (start-up)
  nor the last (which validates on **every** client, so the final metrics cover all sites);
* ``last_round_seconds`` and ``setup_seconds`` (the fit's wall time outside rounds: the sites
  preparing their data, once, and the simulation starting);
* ``peak_memory_gib``: the peak proportional set size (PSS, so shared pages count once) of the
  benchmark process and every process below it (Ray's GCS, raylet and workers), sampled twice a
  second from ``/proc`` (Linux);
* ``failed_client_rounds`` and ``memory_kills`` (client failures whose reason mentions memory:
  must be 0);
* the fixed cost of one client-round: ``client_seconds`` (the train message on the client,
  receipt to reply) against ``step_seconds`` (inside training steps), medians over all
  client-rounds.

The ratio ``round_seconds(1,000) / round_seconds(100)`` is the target (≤ 1.3, within 6 GiB).

Usage::

    python benchmarks/scale.py                                   # 100, 1,000, 10,000
    python benchmarks/scale.py --populations 100 1000 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from runner import fit_variant  # benchmarks/runner.py (scripts run from benchmarks/)

from fedvlm.runs import read_metrics

SAMPLED = 20
GIB = 1024**3


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def tree_pss_bytes(root: int) -> int:
    """PSS of ``root`` and all its descendants (``/proc/PID/smaps_rollup``)."""
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        stack += _children(pid)
    return total


class PeakMemory:
    """Samples :func:`tree_pss_bytes` of this process in a thread; ``peak`` after ``stop``."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def summarise(run_dir: Path, fit_seconds: float) -> dict[str, Any]:
    """Round times, failures and per-client-round timings of a finished run."""
    rows = read_metrics(run_dir)
    middle = rows[1:-1] or rows[:1]
    clients = [c for row in rows for c in row["clients"].values() if "client_seconds" in c]
    failed = [why for row in rows for why in row["failed_clients"].values()]
    return {
        "rounds": len(rows),
        "round_seconds": round(statistics.median(r["round_seconds"] for r in middle), 2),
        "round_seconds_each": [round(r["round_seconds"], 2) for r in rows],
        "last_round_seconds": round(rows[-1]["round_seconds"], 2),
        "setup_seconds": round(fit_seconds - sum(r["round_seconds"] for r in rows), 1),
        "failed_client_rounds": len(failed),
        "memory_kills": sum("memory" in why.lower() for why in failed),
        "client_seconds": round(statistics.median(c["client_seconds"] for c in clients), 3) if clients else None,
        "train_seconds": round(statistics.median(c["train_seconds"] for c in clients), 3) if clients else None,
        "step_seconds": round(statistics.median(c["step_seconds"] for c in clients), 3) if clients else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-client", type=int, default=23, help="cases per client (70%% train: ~16)")
    parser.add_argument("--runs", type=Path, default=Path("runs/scale"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every population")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for population in args.populations:
        overrides = [
            f"federation.num_clients={population}",
            f"federation.clients_per_round={SAMPLED}",
            f"federation.evaluate_clients_per_round={SAMPLED}",
            f"federation.rounds={args.rounds}",
            f"data.synthetic.n={population * args.per_client}",
            "data.partition=iid",
            *args.overrides,
        ]
        out = args.runs / f"leukemia_demo-{population}-{time.strftime('%Y%m%d-%H%M%S')}"
        with PeakMemory() as memory:
            result = fit_variant("leukemia_demo", out, overrides, ())
        result["peak_memory_gib"] = round(memory.peak / GIB, 2)
        if result["exit_code"] == 0:
            result.update(summarise(out, result["seconds"]))
        results[str(population)] = result
        print(json.dumps({population: result}, indent=1), flush=True)
    if "100" in results and "1000" in results and results["100"].get("round_seconds"):
        ratio = results["1000"].get("round_seconds", float("nan")) / results["100"]["round_seconds"]
        results["ratio_1000_vs_100"] = round(ratio, 3)
        results["target"] = "round_seconds(1000) <= 1.3 x round_seconds(100), peak memory <= 6 GiB"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sampled": SAMPLED, "cores": os.cpu_count(), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
