"""The built-in tasks, registered: importing this module fills :data:`fedvlm.tasks.tasks`."""

from __future__ import annotations

import fedvlm.tasks.cxr.task
import fedvlm.tasks.leukemia.task
import fedvlm.tasks.lightning  # noqa: F401 - registers "leukemia", "cxr", "lightning"
from fedvlm.tasks.base import tasks

__all__ = ["tasks"]
