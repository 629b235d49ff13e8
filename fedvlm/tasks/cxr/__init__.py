"""Chest X-ray vision-language model (FedVLM): radiographs and reports.

Everything of the task lives here: records, public layouts, tables and report parsing
(:mod:`.records`, :mod:`.layouts`, :mod:`.tables`, :mod:`.reports`), the synthetic generator
(:mod:`.synthetic`, :mod:`.render`), the contrastive LightningModule (:mod:`.module`), its
metrics (:mod:`.metrics`), Grad-CAM and token grounding scored against known lesions
(:mod:`.grounding`, :mod:`.scores`, :mod:`.explain`) and the
:class:`~fedvlm.tasks.cxr.task.CxrTask` that the round loop talks to (:mod:`.task`).
"""
