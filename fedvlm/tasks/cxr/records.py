"""The one in-memory form every chest X-ray data source is read into.

Loaders for real layouts (MIMIC-CXR-JPG, NIH ChestX-ray14, Indiana University / OpenI) and the
synthetic generator all produce a :class:`CxrDataset`: records plus the label names their label
vectors are aligned to. Splitting, partitioning and tensor preparation only ever see records.

Labels are floats: ``1.0`` present, ``0.0`` absent, ``nan`` unknown (not mentioned, or an
uncertain CheXpert label under the ``ignore`` policy). Losses and metrics skip ``nan`` entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedvlm.data.prepared import Bundle, decode_images, sample_tensors
from fedvlm.data.streaming import ImageSpec
from fedvlm.errors import DataError

#: The 14 CheXpert observations, in the column order of ``mimic-cxr-2.0.0-chexpert.csv``.
CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

#: The 14 NIH ChestX-ray14 findings, spelled as in ``Data_Entry_2017.csv``.
CHESTXRAY14_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


@dataclass(frozen=True)
class LesionBox:
    """A finding's bounding box in image pixels (ChestX-ray14 ``BBox_List_2017.csv``, synthetic lesions)."""

    label: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class CxrRecord:
    """One chest radiograph and its report.

    Attributes:
        image: Path of the image file, or an ``H×W`` ``uint8`` array for generated data.
        report: Report text (FINDINGS and IMPRESSION); empty only for image-only sources
            (ChestX-ray14).
        labels: One float per entry of the dataset's ``label_names``: 1 present, 0 absent,
            ``nan`` unknown.
        patient: Patient identifier; splits never put one patient on both sides.
        study: Study identifier (several images may share a study and its report).
        site: Hospital / acquisition site, used to form clients by site; may be ``None``.
        split: Official split of the source (``train``/``validate``/``test``), ``None`` if none.
        view: View position (``PA``, ``AP``, ``LATERAL`` ...), ``None`` when unknown.
        source: Where the record came from (``"Data_Entry_2017.csv:12"``), used in error messages.
        boxes: Known lesion boxes (for Grad-CAM pointing accuracy / mIoU); empty when unknown.
        lesion_mask: Pixel mask ``H×W`` ``uint8`` of finding index + 1 (0 = background), for
            synthetic data only; ``None`` otherwise.
        finding_phrases: ``(label, phrase)`` pairs: the report phrase that states each finding
            (synthetic data only), for evaluating token↔region grounding.
    """

    image: Path | np.ndarray
    report: str
    labels: tuple[float, ...]
    patient: str
    study: str = ""
    site: str | None = None
    split: str | None = None
    view: str | None = None
    source: str = ""
    boxes: tuple[LesionBox, ...] = field(default=())
    lesion_mask: np.ndarray | None = None
    finding_phrases: tuple[tuple[str, str], ...] = field(default=())

    def validate(self, num_labels: int) -> None:
        """Check the label vector.

        Raises:
            DataError: Naming ``source`` when the vector has the wrong length or a value that is
                not 0, 1 or nan.
        """
        where = self.source or self.patient
        if len(self.labels) != num_labels:
            raise DataError(f"{where}: expected {num_labels} labels, got {len(self.labels)}")
        for value in self.labels:
            if not (math.isnan(value) or value in (0.0, 1.0)):
                raise DataError(f"{where}: label values must be 0, 1 or empty, got {value!r}")


@dataclass
class CxrDataset:
    """Records plus the label names their ``labels`` vectors follow, and what was skipped.

    Attributes:
        records: The samples.
        label_names: Names of the label vector's entries.
        skipped: Counted, documented skips (``reason -> count``), printed at the end of a run;
            never a silent drop.
    """

    records: list[CxrRecord]
    label_names: tuple[str, ...]
    skipped: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        """Validate every record (see :meth:`CxrRecord.validate`)."""
        for record in self.records:
            record.validate(len(self.label_names))

    def label_matrix(self) -> np.ndarray:
        """``[N, C]`` float array of labels (``nan`` unknown)."""
        if not self.records:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        return np.array([r.labels for r in self.records], dtype=np.float32)


def cxr_image_spec(image_size: int, equalize: bool = True) -> ImageSpec:
    """Radiographs: grayscale at ``image_size``; with ``equalize`` histogram-equalised first:
    exposure, window and gamma differ between scanners and hospitals, and BatchNorm statistics
    averaged across sites by FedAvg fit none of them unless intensities are brought to one
    distribution."""
    return ImageSpec(1, image_size, equalize)


def cxr_tensors(
    records: Sequence[CxrRecord],
    tokenizer: PreTrainedTokenizerBase | None,
    max_text_length: int,
    indices: Sequence[int] | None = None,
) -> Bundle:
    """The per-sample tensors of chest X-ray records, images aside: ``labels`` ``[N,C]``
    (``nan`` unknown), ``report_group`` (rows with identical report text share an id, for
    retrieval), ``index`` and token tensors."""
    groups: dict[str, int] = {}
    labels = {
        "labels": torch.tensor(np.array([r.labels for r in records], dtype=np.float32).reshape(len(records), -1)),
        "report_group": torch.tensor([groups.setdefault(r.report, len(groups)) for r in records], dtype=torch.long),
    }
    return sample_tensors(labels, [r.report for r in records], tokenizer, max_text_length, indices)


def prepare_cxr_bundle(
    records: Sequence[CxrRecord],
    tokenizer: PreTrainedTokenizerBase | None,
    image_size: int,
    max_text_length: int,
    indices: Sequence[int] | None = None,
    equalize: bool = True,
) -> Bundle:
    """Chest X-ray records as an in-memory bundle: one-channel ``uint8`` images ``[N,1,S,S]``
    (:func:`cxr_image_spec`) and the tensors of :func:`cxr_tensors`.

    Raises:
        DataError: From image reading, naming the file at fault.
    """
    images = decode_images(cxr_image_spec(image_size, equalize), [r.image for r in records])
    return {"image": images, **cxr_tensors(records, tokenizer, max_text_length, indices)}
