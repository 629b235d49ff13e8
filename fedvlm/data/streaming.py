"""Streaming site data: a split's images are read one at a time, never held all in memory.

A site's prepared split is a :class:`SiteSplit`: the small per-sample tensors (labels, token ids,
sample indices) in memory, and the images as :class:`SplitImages`, read one row at a time inside
the DataLoader, either

- from the site-local **cache** of resized images (``data.image_cache: true``, the default): one
  file of fixed-size ``uint8`` rows ``[C, S, S]`` written while preparing, one image decoded at a
  time, so every image is validated up front and a training epoch reads raw bytes; or
- from the **source files** themselves (``data.image_cache: false``): each image is decoded,
  converted and resized in the DataLoader (in its workers with ``trainer.num_workers > 0``);
  nothing is written but the list of paths.

Rows are read with ``os.pread`` rather than a memory map: the pages a memory map touches count as
the process's resident memory, which would then grow with the split's size after one epoch.

:class:`ImageSpec` is the one place where a decoded image becomes a model-ready ``uint8`` array,
for in-memory bundles (:func:`fedvlm.tasks.leukemia.records.prepare_bundle`) and streamed splits alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from fedvlm.errors import DataError


@dataclass(frozen=True)
class ImageSpec:
    """How a source image becomes a model-ready ``uint8`` array ``[channels, size, size]``.

    Attributes:
        channels: 3 (RGB: blood smears) or 1 (grayscale: radiographs, averaged over RGB).
        size: Side length after a bilinear resize.
        equalize: Histogram-equalise a grayscale image before resizing (scanner intensity shift).

    A grayscale JPEG is decoded at the smallest scale (1, 1/2, 1/4 or 1/8, in the DCT domain) that
    keeps both sides ≥ ``size`` before the resize: most of the cost of a full-resolution
    radiograph, for pixels that the resize would average away.
    """

    channels: int
    size: int
    equalize: bool = False

    @property
    def row_bytes(self) -> int:
        """Bytes of one image in the cache."""
        return self.channels * self.size * self.size

    def decode(self, image: np.ndarray | str | Path) -> np.ndarray:
        """``image`` (an ``H×W×3`` ``uint8`` array, or a file) as a ``[C, S, S]`` ``uint8`` array.

        Raises:
            DataError: Naming the file when it is missing or cannot be decoded.

        Example:
            >>> pixels = np.tile(np.array([30, 60, 91], dtype=np.uint8), (2, 2, 1))  # H×W×RGB
            >>> ImageSpec(1, 2).decode(pixels).tolist()  # grayscale: the channel mean, rounded
            [[[60, 60], [60, 60]]]
            >>> ImageSpec(3, 2).decode(pixels)[:, 0, 0].tolist()  # RGB: channels first
            [30, 60, 91]
        """
        from fedvlm.data.images import read_grayscale_image, read_image

        if self.channels == 1:  # radiographs are grayscale; colour is averaged over its channels
            if isinstance(image, np.ndarray):
                gray = image.mean(axis=2).round().astype(np.uint8) if image.ndim == 3 else image
                picture = Image.fromarray(gray)
            else:
                picture = read_grayscale_image(Path(image), at_least=self.size)  # JPEGs: draft decode
            if self.equalize:
                picture = ImageOps.equalize(picture)
            if picture.size != (self.size, self.size):
                picture = picture.resize((self.size, self.size), Image.Resampling.BILINEAR)
            return np.array(picture)[np.newaxis]
        pixels = image if isinstance(image, np.ndarray) else read_image(Path(image))
        return np.ascontiguousarray(_resize(pixels, self.size).transpose(2, 0, 1))

    def to_json(self) -> dict[str, Any]:
        return {"channels": self.channels, "size": self.size, "equalize": self.equalize}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageSpec:
        return cls(int(data["channels"]), int(data["size"]), bool(data["equalize"]))


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    if pixels.shape[0] == size and pixels.shape[1] == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))


class ImageRows(Protocol):
    """Images addressed by row: what a :class:`SiteSplit` streams from."""

    def __len__(self) -> int: ...

    def __getitem__(self, row: int) -> torch.Tensor:
        """Image ``row`` as a ``uint8`` tensor ``[C, S, S]``."""
        ...


class SplitImages:
    """One split's images, read one row at a time from the cache file or decoded from the sources.

    Args:
        spec: How each image is shaped.
        count: Number of rows.
        cache: The cache file (``count`` rows of ``spec.row_bytes``), or None to decode ``sources``.
        sources: One image file per row (when there is no cache).

    Raises:
        DataError: If the cache file is missing or its size does not match ``count`` rows.
    """

    def __init__(
        self, spec: ImageSpec, count: int, cache: Path | None = None, sources: Sequence[str] | None = None
    ) -> None:
        self._fd: int | None = None  # first: __del__ runs even when a check below refuses the cache
        self._pid = -1
        if (cache is None) == (sources is None):
            raise ValueError("SplitImages reads either a cache file or source files")
        if sources is not None and len(sources) != count:
            raise DataError(f"{count} rows but {len(sources)} image files")
        if cache is not None:
            expected = count * spec.row_bytes
            size = cache.stat().st_size if cache.is_file() else -1
            if size != expected:
                state = "missing" if size < 0 else f"{size} bytes, expected {expected}"
                raise DataError(f"image cache {cache} is {state}: prepare the site again")
        self.spec, self.count, self.cache, self.sources = spec, count, cache, sources

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> torch.Tensor:
        if not 0 <= row < self.count:
            raise IndexError(f"image row {row} out of range (0..{self.count - 1})")
        if self.sources is not None:
            return torch.from_numpy(self.spec.decode(self.sources[row]))
        raw = os.pread(self._descriptor(), self.spec.row_bytes, row * self.spec.row_bytes)
        shape = (self.spec.channels, self.spec.size, self.spec.size)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(shape)

    def _descriptor(self) -> int:
        # One descriptor per process: DataLoader workers fork, and pread needs no shared offset.
        if self._fd is None or self._pid != os.getpid():
            assert self.cache is not None
            self._fd, self._pid = os.open(self.cache, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


class ConcatImages:
    """Several splits' images as one sequence of rows (e.g. all of a held-out hospital's data)."""

    def __init__(self, parts: Sequence[ImageRows]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, row: int) -> torch.Tensor:
        if not 0 <= row < len(self):
            raise IndexError(f"image row {row} out of range (0..{len(self) - 1})")
        part = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.parts[part][row - int(self.offsets[part])]


class ImageCacheWriter:
    """Writes a split's image cache row by row (a temporary file, renamed when complete).

    Example:
        >>> import tempfile
        >>> spec = ImageSpec(1, 2)
        >>> path = Path(tempfile.mkdtemp()) / "train.images"
        >>> with ImageCacheWriter(path, spec) as writer:
        ...     writer.write(np.full((3, 3, 3), 5, dtype=np.uint8))
        >>> SplitImages(spec, 1, cache=path)[0].tolist()
        [[[5, 5], [5, 5]]]
    """

    def __init__(self, path: Path, spec: ImageSpec) -> None:
        self.path, self.spec, self.count = path, spec, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(path.name + ".tmp")
        self._handle = self._tmp.open("wb")

    def write(self, image: np.ndarray | str | Path) -> None:
        """Decode (where needed), shape and append one image."""
        self._handle.write(self.spec.decode(image).tobytes())
        self.count += 1

    def close(self) -> None:
        self._handle.close()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        self._handle.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ImageCacheWriter:
        return self

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


@dataclass
class SiteSplit:
    """One prepared split of a site: per-sample tensors in memory, images streamed.

    ``split[key]`` is the tensor ``key`` (``index``, labels, ``input_ids`` ...); the images are
    read row by row through :attr:`images` (a DataLoader over
    :class:`~fedvlm.data.prepared.BundleDataset` does so); :meth:`take` materialises a few rows.
    """

    tensors: dict[str, torch.Tensor]
    images: ImageRows

    def __post_init__(self) -> None:
        if len(self.images) != len(self):
            raise DataError(f"a split with {len(self)} samples has {len(self.images)} images")

    def __len__(self) -> int:
        return int(self.tensors["index"].shape[0])

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "image":
            raise KeyError("a streamed split holds no image tensor: read rows of .images, or take(rows)")
        return self.tensors[key]

    __iter__ = None  # not a mapping: "for key in split" would silently skip the images

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def take(self, rows: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The rows ``rows`` in memory, images included (an in-memory bundle)."""
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        chosen = {key: value[index] for key, value in self.tensors.items()}
        shape = (0, 1, 1, 1)  # the shape of no images; stacked rows carry their own
        images = [self.images[int(row)] for row in index]
        chosen["image"] = torch.stack(images) if images else torch.empty(shape, dtype=torch.uint8)
        return chosen


def concat_tensors(parts: Sequence[Mapping[str, torch.Tensor]], offset: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Row-wise concatenation of the tensors every part has. Each key in ``offset`` holds ids
    numbered from 0 within its part (sample indices, report groups); it is shifted past the
    previous parts' largest id, so that two parts' ids never collide.

    Example:
        >>> first = {"index": torch.tensor([0, 1]), "y": torch.tensor([5, 6])}
        >>> parts = [first, {"index": torch.tensor([0]), "y": torch.tensor([7])}]
        >>> {k: v.tolist() for k, v in concat_tensors(parts, offset=["index"]).items()}
        {'index': [0, 1, 2], 'y': [5, 6, 7]}
    """
    keys = set.intersection(*(set(part) for part in parts))
    merged = {}
    for key in sorted(keys):
        values, shift = [], 0
        for part in parts:
            values.append(part[key] + shift if key in offset else part[key])
            if key in offset and len(part[key]):
                shift += int(part[key].max()) + 1
        merged[key] = torch.cat(values)
    return merged


def concat_splits(splits: Sequence[SiteSplit]) -> SiteSplit:
    """Several splits of one site as one. Sample indices are already distinct within a site;
    report groups (numbered per split) are offset so that two splits' groups never collide."""
    tensors = concat_tensors([split.tensors for split in splits], offset=["report_group"])
    return SiteSplit(tensors, ConcatImages([s.images for s in splits]))


__all__ = [
    "ConcatImages",
    "ImageCacheWriter",
    "ImageRows",
    "ImageSpec",
    "SiteSplit",
    "SplitImages",
    "concat_splits",
    "concat_tensors",
]
