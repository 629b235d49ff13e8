"""Tasks: what federation needs to know about a problem, behind one interface.

A task prepares a run's data (split, partition, per-client shards), builds its LightningModule,
and evaluates a model into mergeable metrics. The federation layer only talks to this
interface, so the leukemia task and the chest X-ray task share one round loop.
"""

from __future__ import annotations

from fedvlm.tasks.base import Task, tasks

__all__ = ["Task", "get_task", "tasks"]


def get_task(name: str) -> Task:
    """The registered task ``name`` (importing the built-in tasks on first use)."""
    import fedvlm.tasks.cxr
    import fedvlm.tasks.leukemia  # noqa: F401 - registers "leukemia"

    return tasks.create(name)
