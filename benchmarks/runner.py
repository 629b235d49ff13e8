"""Run one ``fedvlm fit`` variant in-process and keep what a results table needs."""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedvlm.cli import main as fedvlm_main
from fedvlm.runs import read_metrics


def fit_variant(recipe: str, out: Path, overrides: Sequence[str], metrics: Sequence[str]) -> dict[str, Any]:
    """``fedvlm fit --recipe RECIPE --out OUT OVERRIDES``; returns the command, exit code, wall
    seconds, the number of rounds, the summed round seconds and traffic, and the last round's
    ``metrics`` (missing keys are None)."""
    argv = ["fit", "--recipe", recipe, "--out", str(out), *overrides]
    started = time.perf_counter()
    code = fedvlm_main(argv)
    result: dict[str, Any] = {"command": shlex.join(["fedvlm", *argv]), "run_dir": str(out), "exit_code": code}
    result["seconds"] = round(time.perf_counter() - started, 1)
    if code == 0:
        rows = read_metrics(out)
        last = rows[-1]
        result.update(
            {
                "round": last["round"],
                "round_seconds_total": round(sum(row["round_seconds"] for row in rows), 1),
                "bytes_total": sum(row["bytes_sent"] + row["bytes_received"] for row in rows),
                **{key: last.get(key) for key in metrics},
            }
        )
    return result
