"""Prepared tensors: records turned into model-ready arrays once, stored per client.

A run prepares each client's shard and the server's test set as a *bundle* (a dict of tensors:
``uint8`` images, token ids, labels) saved under ``RUN_DIR/data/``. A client process (a Ray
actor in simulation, a fresh process per round under Flower's deployment engine) loads only its
own shard, so preparation cost is paid once and nothing about other sites is in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from fedvlm.config import AUGMENTATIONS
from fedvlm.data.cxr_records import CxrRecord
from fedvlm.data.records import LeukemiaRecord
from fedvlm.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Bundle = dict[str, torch.Tensor]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an ``H×W×3`` uint8 image to ``size×size`` (bilinear); a no-op when already sized."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def prepare_bundle(
    records: Sequence[LeukemiaRecord],
    tokenizer: PreTrainedTokenizerBase | None,
    image_size: int,
    max_text_length: int,
    indices: Sequence[int] | None = None,
) -> Bundle:
    """Turn records into a bundle of tensors.

    Args:
        records: The samples, in order.
        tokenizer: Tokenizes the reports; None for an image-only model (no text tensors).
        image_size: Images are resized to ``image_size × image_size``.
        max_text_length: Reports are padded/truncated to this many tokens.
        indices: Global sample indices stored alongside (defaults to ``0..N-1``).

    Raises:
        DataError: From image reading, naming the file at fault.
    """
    from fedvlm.data.images import read_image

    images = np.empty((len(records), image_size, image_size, 3), dtype=np.uint8)
    for row, record in enumerate(records):
        pixels = record.image if isinstance(record.image, np.ndarray) else read_image(Path(record.image))
        images[row] = resize_image(pixels, image_size)
    bundle: Bundle = {
        "image": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "leukemia": torch.tensor([r.leukemia for r in records], dtype=torch.long),
        "stage": torch.tensor([-1 if r.stage is None else r.stage for r in records], dtype=torch.long),
        "index": torch.tensor(list(indices) if indices is not None else range(len(records)), dtype=torch.long),
    }
    if tokenizer is not None:
        bundle.update(tokenize(tokenizer, [r.report for r in records], max_text_length))
    return bundle


def prepare_cxr_bundle(
    records: Sequence[CxrRecord],
    tokenizer: PreTrainedTokenizerBase | None,
    image_size: int,
    max_text_length: int,
    indices: Sequence[int] | None = None,
    equalize: bool = True,
) -> Bundle:
    """Turn chest X-ray records into a bundle: one-channel ``uint8`` images ``[N,1,S,S]``,
    ``labels`` ``[N,C]`` (``nan`` unknown), ``report_group`` (rows with identical report text
    share an id, for retrieval) and token tensors.

    With ``equalize`` each radiograph is histogram-equalised first: exposure, window and gamma
    differ between scanners and hospitals, and BatchNorm statistics averaged across sites by
    FedAvg fit none of them unless intensities are brought to one distribution.

    Raises:
        DataError: From image reading, naming the file at fault.
    """
    from fedvlm.data.images import read_image

    images = np.empty((len(records), 1, image_size, image_size), dtype=np.uint8)
    for row, record in enumerate(records):
        pixels = record.image if isinstance(record.image, np.ndarray) else read_image(Path(record.image))
        if pixels.ndim == 3:  # radiographs are grayscale; files decode to RGB
            pixels = pixels.mean(axis=2).round().astype(np.uint8)
        if equalize:
            pixels = np.asarray(ImageOps.equalize(Image.fromarray(pixels)))
        images[row, 0] = np.asarray(Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BILINEAR))
    groups: dict[str, int] = {}
    bundle: Bundle = {
        "image": torch.from_numpy(images),
        "labels": torch.tensor(np.array([r.labels for r in records], dtype=np.float32).reshape(len(records), -1)),
        "report_group": torch.tensor([groups.setdefault(r.report, len(groups)) for r in records], dtype=torch.long),
        "index": torch.tensor(list(indices) if indices is not None else range(len(records)), dtype=torch.long),
    }
    if tokenizer is not None:
        bundle.update(tokenize(tokenizer, [r.report for r in records], max_text_length))
    return bundle


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_text_length: int) -> Bundle:
    """Token ids (``int32``) and attention masks (``uint8``), padded/truncated to ``max_text_length``."""
    tokens = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_text_length, return_tensors="pt"
    )
    return {
        "input_ids": tokens["input_ids"].to(torch.int32),
        "attention_mask": tokens["attention_mask"].to(torch.uint8),
    }


def subset(bundle: Mapping[str, torch.Tensor], rows: Sequence[int] | np.ndarray) -> Bundle:
    """The rows ``rows`` of every tensor in ``bundle``."""
    index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    return {key: value[index] for key, value in bundle.items()}


def bundle_size(bundle: Mapping[str, torch.Tensor]) -> int:
    """Number of samples in a bundle."""
    return int(next(iter(bundle.values())).shape[0])


def save_bundle(bundle: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save atomically (temporary file, then rename), so a crash leaves no half-written shard."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(dict(bundle), tmp)
    tmp.replace(path)


def load_bundle(path: Path) -> Bundle:
    """Load a bundle saved by :func:`save_bundle`.

    Raises:
        DataError: If the file is missing or unreadable, naming it.
    """
    if not path.is_file():
        raise DataError(f"prepared data {path} is missing (was the run directory prepared?)")
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:
        raise DataError(f"prepared data {path} is unreadable: {err}") from err


class BundleDataset(Dataset[dict[str, torch.Tensor]]):
    """A map-style dataset over a bundle; images become ImageNet-normalised floats.

    Args:
        bundle: The tensors.
        augment: One of :data:`AUGMENTATIONS` (training only).
    """

    def __init__(self, bundle: Mapping[str, torch.Tensor], augment: str = "none") -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r} is not one of: {', '.join(AUGMENTATIONS)}")
        self.augment = augment
        self.bundle = dict(bundle)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return bundle_size(self.bundle)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        item = {key: value[row] for key, value in self.bundle.items()}
        image = item["image"]
        if self.augment == "dihedral":
            flip, quarter_turns = torch.randint(0, 2, ()).item(), int(torch.randint(0, 4, ()).item())
            image = torch.rot90(image.flip(-1) if flip else image, quarter_turns, dims=(-2, -1))
        if image.shape[0] == 1:  # grayscale radiographs feed three-channel backbones
            image = image.expand(3, -1, -1)
        item["image"] = (image.float() / 255.0 - self.mean) / self.std
        if "input_ids" in item:
            item["input_ids"] = item["input_ids"].long()
            item["attention_mask"] = item["attention_mask"].long()
        return item


def make_loader(
    bundle: Mapping[str, torch.Tensor],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    augment: str = "none",
) -> DataLoader[dict[str, torch.Tensor]]:
    """A DataLoader over a bundle; shuffling is seeded so a round is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        BundleDataset(bundle, augment),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=False,
    )
