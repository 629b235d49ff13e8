"""Per-patient SHAP explanations of both heads, on image patches and report words.

:func:`explain_patients` is the one code path: :class:`ShapCallback` calls it at the end of
each local round, and a ``fedvlm explain RUN_DIR`` command can call it on saved weights.
"""

from fedvlm.explain.callback import ShapCallback, load_round, summarize, write_round
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
    "ModalityExplanation",
    "PatientExplanation",
    "ShapCallback",
    "TokenVocabulary",
    "exact_shapley",
    "explain_patients",
    "fused_profile",
    "kernel_shapley",
    "load_round",
    "permutation_shapley",
    "summarize",
    "write_round",
]
