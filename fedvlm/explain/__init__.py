"""Per-patient SHAP explanations of both heads, on image patches and report words.

:func:`explain_patients` is the one code path: :class:`ShapCallback` calls it at the end of
each local round, and a ``fedvlm explain RUN_DIR`` command can call it on saved weights.

Chest X-ray runs are explained by :func:`fedvlm.explain_cxr.explain_cxr_run`: Grad-CAM
(:mod:`.gradcam`) and token↔region grounding (:mod:`.grounding`) heatmaps, scored against known lesions
(:mod:`.cxr_scores`: pointing accuracy, mIoU, text alignment, with chance levels).
"""

from fedvlm.explain.callback import ShapCallback, load_round, summarize, write_round
from fedvlm.explain.cxr_scores import HeatmapThreshold, LocalizationScores
from fedvlm.explain.gradcam import cxr_grad_cam, grad_cam
from fedvlm.explain.grounding import TextAlignmentScores, phrase_heatmaps, region_embeddings
from fedvlm.explain.shapley import (
    HEADS,
    IMAGE_BASELINES,
    TEXT_BASELINES,
    ExplainSettings,
    ModalityExplanation,
    PatientExplanation,
    TokenVocabulary,
    exact_shapley,
    explain_patients,
    fused_profile,
    kernel_shapley,
    permutation_shapley,
)

__all__ = [
    "HEADS",
    "IMAGE_BASELINES",
    "TEXT_BASELINES",
    "ExplainSettings",
    "HeatmapThreshold",
    "LocalizationScores",
    "ModalityExplanation",
    "PatientExplanation",
    "ShapCallback",
    "TextAlignmentScores",
    "TokenVocabulary",
    "cxr_grad_cam",
    "exact_shapley",
    "explain_patients",
    "fused_profile",
    "grad_cam",
    "kernel_shapley",
    "load_round",
    "permutation_shapley",
    "phrase_heatmaps",
    "region_embeddings",
    "summarize",
    "write_round",
]
