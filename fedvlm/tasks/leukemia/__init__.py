"""Leukemia detection and staging (Fed-MMX): blood-smear images and clinical narratives.

Everything of the task lives here: records and public layouts (:mod:`.records`, :mod:`.layouts`),
the synthetic generator (:mod:`.synthetic`, :mod:`.smear_render`), the LightningModule
(:mod:`.module`), its metrics (:mod:`.metrics`), per-patient SHAP on each client (:mod:`.shap`)
and the :class:`~fedvlm.tasks.leukemia.task.LeukemiaTask` that the round loop talks to
(:mod:`.task`). Shared machinery (Shapley estimators, partitioners, image I/O) knows no task.
"""
