"""Leukemia detection alone: the built-in task, with checkpoints chosen by detection AUROC."""

from __future__ import annotations

from fedvlm.tasks.base import tasks
from fedvlm.tasks.leukemia.task import LeukemiaTask


@tasks.register("leukemia_detection")
class LeukemiaDetectionTask(LeukemiaTask):
    name = "leukemia_detection"
    selection_metric = "auroc"  # best.ckpt by the merged validation AUROC, not stage macro-F1
    curve_metrics = ("test/accuracy", "test/auroc")
