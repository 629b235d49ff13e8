"""``fedvlm explain RUN_DIR``: explanations of a trained run, the same outputs as during training.

Leukemia runs get per-patient SHAP (both heads, image patches and report words) written like
the per-round :class:`~fedvlm.tasks.leukemia.shap.ShapCallback` output; chest X-ray runs get
Grad-CAM heatmaps, token↔region grounding and their interpretability scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedvlm.config import load_run_config
from fedvlm.data.prepared import bundle_size, subset
from fedvlm.errors import ConfigError, DataError
from fedvlm.runs import RunLayout, read_metrics
from fedvlm.tasks.base import load_trained_module


def explain_run(
    run_dir: Path,
    patients: Sequence[int] | None = None,
    num_patients: int = 8,
    out: Path | None = None,
    overrides: Sequence[str] = (),
    checkpoint: str = "last",
    console: Console | None = None,
    client: int = 0,
) -> dict[str, Any]:
    """Explain test-set patients of one site of a trained run (only that site's data are read).

    Args:
        run_dir: A run directory written by ``fedvlm fit``.
        patients: Global sample indices (the ``index`` of the prepared data) of test-set patients;
            default: the first ``num_patients`` of the test split.
        num_patients: How many test patients when ``patients`` is not given.
        out: Output folder (default ``RUN_DIR/explanations/``).
        overrides: ``explain.*`` overrides (baselines, ``max_evals``, ``top_k``).
        checkpoint: ``last`` or ``best``.
        console: Where the summary goes.
        client: The partition id of the site whose test patients are explained.

    Returns:
        The aggregate scores written to the output folder.

    Raises:
        ConfigError: For overrides outside ``explain.*`` or a run without a checkpoint.
        DataError: If a requested patient is not in the test split.
    """
    console = console or Console()
    cfg = load_run_config(run_dir, overrides, "explain", "fedvlm explain")
    out_dir = out or RunLayout(run_dir).explanations
    if cfg.task == "cxr":
        from fedvlm.tasks.cxr.explain import explain_cxr_run

        if patients:
            raise ConfigError("--patients selects leukemia patients; for a CXR run use --num-patients")
        scores = explain_cxr_run(run_dir, num_patients, out_dir, checkpoint=checkpoint, client=client)
        console.print(scores)
        return scores

    from fedvlm.tasks.leukemia.task import make_shap_callback
    from fedvlm.tasks.site_store import client_site

    module = load_trained_module(run_dir, cfg, checkpoint)
    site = client_site(run_dir, client)
    test = site.test
    if patients:
        position = {int(index): row for row, index in enumerate(test["index"].tolist())}
        missing = [p for p in patients if p not in position]
        if missing:
            raise DataError(f"patients {missing} are not in the test split of site {site.site} (client {client})")
        chosen = subset(test, [position[p] for p in patients])
    else:
        chosen = subset(test, range(min(num_patients, bundle_size(test))))
    rows = read_metrics(run_dir)
    last_round = rows[-1]["round"] if rows else 0
    callback = make_shap_callback(cfg, run_dir, chosen, bundle_size(chosen), out_dir, last_round, site.directory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny batched forwards: one thread avoids spinning on small machines
    try:
        summary = callback.explain(module)
    finally:
        torch.set_num_threads(threads)
    for key, value in sorted(summary.items()):
        console.print(f"{key:<36} {value:.4g}")
    console.print(f"explanations of {bundle_size(chosen)} patients: {out_dir}")
    return summary
