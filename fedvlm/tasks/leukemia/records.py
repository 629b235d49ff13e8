"""The one in-memory form every leukemia data source is read into.

Loaders for real layouts (ALL-IDB1/2, C-NMC 2019, a manifest) and the synthetic generator all
produce :class:`LeukemiaRecord` lists; splitting, partitioning and tensor preparation only ever
see records, so a new source is added by writing one loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedvlm.data.prepared import Bundle, decode_images, sample_tensors
from fedvlm.data.streaming import ImageSpec
from fedvlm.errors import DataError

NUM_STAGES_DEFAULT = 4
STAGE_NAMES = ("I", "II", "III", "IV")


@dataclass(frozen=True)
class LeukemiaRecord:
    """One patient sample: a blood-smear image and a clinical narrative.

    Attributes:
        image: Path of the image file, or an ``H×W×3`` ``uint8`` array for generated data.
        report: The clinical narrative (symptoms, CBC values, blast %); may be empty only
            for image-only sources (ALL-IDB and C-NMC without a reports file).
        leukemia: 1 for leukemia, 0 for a healthy control.
        stage: 0-based clinical stage index (0 = stage I) for positives, ``None`` when negative
            or when the stage is unknown (the stage loss then ignores the sample).
        patient: Patient identifier; splits never put one patient on both sides.
        site: Acquisition site (hospital/lab), used by the by-site partitioner; may be ``None``.
        source: Where the record came from (``"manifest.csv:12"``), used in error messages.
        blast_points: Known blast centres ``(x, y)`` in image pixels (ALL-IDB1 ``.xyc`` files,
            the synthetic generator); empty when unknown.
        signal_words: Report words that carry the diagnostic signal (synthetic data only), used
            to evaluate text explanations.
    """

    image: Path | np.ndarray
    report: str
    leukemia: int
    stage: int | None
    patient: str
    site: str | None = None
    source: str = ""
    blast_points: tuple[tuple[float, float], ...] = field(default=())
    signal_words: tuple[str, ...] = field(default=())

    def validate(self, num_stages: int = NUM_STAGES_DEFAULT) -> None:
        """Check labels are in range.

        Raises:
            DataError: Naming ``source`` when the label or stage is out of range.
        """
        where = self.source or self.patient
        if self.leukemia not in (0, 1):
            raise DataError(f"{where}: label 'leukemia' must be 0 or 1, got {self.leukemia!r}")
        if self.stage is not None:
            if self.leukemia == 0:
                raise DataError(f"{where}: a negative sample (leukemia=0) cannot have a stage")
            if not 0 <= self.stage < num_stages:
                raise DataError(f"{where}: stage {self.stage + 1} is out of range 1..{num_stages}")


def parse_stage(value: object, num_stages: int, where: str) -> int | None:
    """Parse a stage cell (``""``, ``1``..``K``, or a roman numeral ``I``..``IV``, optionally
    prefixed with ``stage``) into a 0-based index.

    Raises:
        DataError: Naming ``where`` when the value is not a stage in ``1..num_stages``.

    Example:
        >>> parse_stage("Stage III", 4, "x"), parse_stage("2", 4, "x"), parse_stage("", 4, "x")
        (2, 1, None)
    """
    text = str(value).strip() if value is not None else ""
    if text == "" or text.lower() in {"nan", "none", "na", "n/a"}:
        return None
    token = text.lower().removeprefix("stage").strip().upper()
    if token in STAGE_NAMES:
        index = STAGE_NAMES.index(token)
    else:
        try:
            number = float(token)
        except ValueError:
            raise DataError(f"{where}: cannot parse stage {text!r} (use 1..{num_stages} or I..IV)") from None
        if number != int(number):
            raise DataError(f"{where}: stage {text!r} is not a whole number")
        index = int(number) - 1
    if not 0 <= index < num_stages:
        raise DataError(f"{where}: stage {text!r} is out of range 1..{num_stages}")
    return index


def leukemia_image_spec(image_size: int) -> ImageSpec:
    """Blood smears: RGB at ``image_size``."""
    return ImageSpec(3, image_size)


def leukemia_tensors(
    records: Sequence[LeukemiaRecord],
    tokenizer: PreTrainedTokenizerBase | None,
    max_text_length: int,
    indices: Sequence[int] | None = None,
) -> Bundle:
    """The per-sample tensors of leukemia records, images aside: ``leukemia``, ``stage`` (−1
    unknown), ``index`` and, with a tokenizer, ``input_ids``/``attention_mask``."""
    labels = {
        "leukemia": torch.tensor([r.leukemia for r in records], dtype=torch.long),
        "stage": torch.tensor([-1 if r.stage is None else r.stage for r in records], dtype=torch.long),
    }
    return sample_tensors(labels, [r.report for r in records], tokenizer, max_text_length, indices)


def prepare_bundle(
    records: Sequence[LeukemiaRecord],
    tokenizer: PreTrainedTokenizerBase | None,
    image_size: int,
    max_text_length: int,
    indices: Sequence[int] | None = None,
) -> Bundle:
    """Leukemia records as an in-memory bundle: ``uint8`` images ``[N,3,S,S]`` and the tensors
    of :func:`leukemia_tensors`. (A site's prepared splits stream their images instead:
    :mod:`fedvlm.data.streaming`.)

    Raises:
        DataError: From image reading, naming the file at fault.
    """
    images = decode_images(leukemia_image_spec(image_size), [r.image for r in records])
    return {"image": images, **leukemia_tensors(records, tokenizer, max_text_length, indices)}
