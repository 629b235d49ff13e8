"""Model-ready tensors: records turned into token ids, labels and ``uint8`` images.

An in-memory *bundle* (a dict of tensors) serves tests, explanations and a few chosen patients;
a site's prepared splits keep only their small per-sample tensors in memory and stream their
images (:mod:`fedvlm.data.streaming`). :class:`BundleDataset` and :func:`make_loader` take either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from fedvlm.data.streaming import ImageRows, ImageSpec, SiteSplit
from fedvlm.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Bundle = dict[str, torch.Tensor]
Samples = Mapping[str, torch.Tensor] | SiteSplit
"""An in-memory bundle or a site's streamed split: what loaders, ``subset`` and ``bundle_size`` take."""

AUGMENTATIONS = ("none", "dihedral")
"""``data.augment`` values. ``dihedral``: a random flip/90° rotation (the 8 symmetries of the
square) per training image, valid where orientation carries no meaning (blood smears; not chest
X-rays)."""


def decode_images(spec: ImageSpec, images: Sequence[np.ndarray | Path | str]) -> torch.Tensor:
    """Every image of ``images`` decoded and shaped by ``spec``: ``uint8`` ``[N, C, S, S]``.

    Raises:
        DataError: From image reading, naming the file at fault.
    """
    stacked = np.empty((len(images), spec.channels, spec.size, spec.size), dtype=np.uint8)
    for row, image in enumerate(images):
        stacked[row] = spec.decode(image)
    return torch.from_numpy(stacked)


def sample_tensors(
    labels: Bundle,
    reports: Sequence[str],
    tokenizer: PreTrainedTokenizerBase | None,
    max_text_length: int,
    indices: Sequence[int] | None = None,
) -> Bundle:
    """A task's label tensors completed with what every task's samples carry: ``index`` (the
    sample's index in its source, ``0..N-1`` by default) and, with a tokenizer, the reports'
    ``input_ids``/``attention_mask``."""
    bundle = dict(labels)
    bundle["index"] = torch.tensor(list(indices) if indices is not None else range(len(reports)), dtype=torch.long)
    if tokenizer is not None:
        bundle.update(tokenize(tokenizer, reports, max_text_length))
    return bundle


TOKENIZE_CHUNK = 1024
"""Reports tokenised per call: a tokenizer's intermediate encodings take kilobytes per text, so a
site's whole split at once would make its memory grow with its size."""


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_text_length: int) -> Bundle:
    """Token ids (``int32``) and attention masks (``uint8``), padded/truncated to ``max_text_length``,
    :data:`TOKENIZE_CHUNK` texts at a time."""
    ids = [torch.zeros((0, max_text_length), dtype=torch.int32)]  # an empty split has no text to batch
    masks = [torch.zeros((0, max_text_length), dtype=torch.uint8)]
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        tokens = tokenizer(
            list(texts[start : start + TOKENIZE_CHUNK]),
            padding="max_length",
            truncation=True,
            max_length=max_text_length,
            return_tensors="pt",
        )
        ids.append(tokens["input_ids"].to(torch.int32))
        masks.append(tokens["attention_mask"].to(torch.uint8))
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}


def subset(samples: Samples, rows: Sequence[int] | np.ndarray) -> Bundle:
    """The rows ``rows`` of ``samples`` as an in-memory bundle (a streamed split's images decoded)."""
    if isinstance(samples, SiteSplit):
        return samples.take(rows)
    index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    return {key: value[index] for key, value in samples.items()}


def bundle_size(samples: Samples) -> int:
    """Number of samples in a bundle or a streamed split."""
    if isinstance(samples, SiteSplit):
        return len(samples)
    return int(next(iter(samples.values())).shape[0])


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
    """A map-style dataset over a bundle or a streamed split; images become ImageNet-normalised
    floats, one row at a time (a streamed split's image is read or decoded here, in the
    DataLoader's worker when it has workers).

    Args:
        samples: The tensors (an in-memory bundle, or a :class:`~fedvlm.data.streaming.SiteSplit`).
        augment: One of :data:`AUGMENTATIONS` (training only).

    Attributes:
        tensors: The per-sample tensors other than the images (labels can be counted from them
            without reading any image).
    """

    def __init__(self, samples: Samples, augment: str = "none") -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r} is not one of: {', '.join(AUGMENTATIONS)}")
        self.augment = augment
        self.images: ImageRows | torch.Tensor | None
        if isinstance(samples, SiteSplit):
            self.tensors, self.images = dict(samples.tensors), samples.images
        else:
            self.tensors = {key: value for key, value in samples.items() if key != "image"}
            self.images = samples.get("image")
        self.size = bundle_size(samples)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        item = {key: value[row] for key, value in self.tensors.items()}
        if self.images is None:
            return self._tokens(item)
        image = self.images[row]
        if self.augment == "dihedral":
            flip, quarter_turns = torch.randint(0, 2, ()).item(), int(torch.randint(0, 4, ()).item())
            image = torch.rot90(image.flip(-1) if flip else image, quarter_turns, dims=(-2, -1))
        if image.shape[0] == 1:  # grayscale radiographs feed three-channel backbones
            image = image.expand(3, -1, -1)
        item["image"] = (image.float() / 255.0 - self.mean) / self.std
        return self._tokens(item)

    @staticmethod
    def _tokens(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "input_ids" in item:
            item["input_ids"] = item["input_ids"].long()
            item["attention_mask"] = item["attention_mask"].long()
        return item


def make_loader(
    bundle: Samples,
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
