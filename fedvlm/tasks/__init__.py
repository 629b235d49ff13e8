"""Tasks: what federation needs to know about a problem, behind one interface.

A task says what the coordinator prepares, how a client opens its own site's data (prepared by
fedvlm, or a user's LightningDataModule), builds its LightningModule, and evaluates a model into
mergeable metrics. The federation layer only talks to this
interface, so the leukemia task and the chest X-ray task share one round loop.
"""

from __future__ import annotations

from fedvlm.tasks.base import Task, tasks

__all__ = ["Task", "get_task", "tasks"]


def get_task(name: str) -> Task:
    """The registered task ``name`` (importing the built-in tasks on first use)."""
    import fedvlm.tasks.builtin  # noqa: F401 - registers "leukemia", "cxr", "lightning"

    return tasks.create(name)
