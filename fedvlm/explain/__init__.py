"""Explanation machinery that knows no task: Shapley estimators over image patches and report
words (:mod:`.shapley`), explanation quality (:mod:`.quality`), Grad-CAM (:mod:`.gradcam`) and
rendering of heatmaps and highlighted reports (:mod:`.render`).

The tasks use it: per-patient SHAP on each client is :mod:`fedvlm.tasks.leukemia.shap`; chest
X-ray Grad-CAM and token grounding scored against known lesions are
:mod:`fedvlm.tasks.cxr.explain`.
"""
