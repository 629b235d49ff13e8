"""The on-disk form of a prepared site: a client's folder ``RUN_DIR/clients/client_NNN/data/``.

Per split the small per-sample tensors (``train.pt``, ``val.pt``, ``test.pt``) and the images,
either as a site-local cache of resized images (``train.images`` ..., ``data.image_cache: true``)
or as the list of the source's files (``images.json``), decoded in the DataLoader
(:mod:`fedvlm.data.streaming`); ``counts.json`` is written last, so its presence means the splits
are complete. :mod:`fedvlm.tasks.site` prepares such a folder; evaluation and explanation read
them back here, one site at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
from transformers import PreTrainedTokenizerBase

from fedvlm.data.prepared import Bundle, bundle_size, load_bundle, save_bundle
from fedvlm.data.streaming import ImageCacheWriter, ImageSpec, SiteSplit, SplitImages, concat_splits, concat_tensors
from fedvlm.errors import ConfigError, DataError
from fedvlm.models.frozen import EmbeddingCache
from fedvlm.runs import RunLayout

if TYPE_CHECKING:
    from fedvlm.tasks.site import SiteRecords

SPLITS = ("train", "val", "test")


COUNTS_FILE = "counts.json"


IMAGES_FILE = "images.json"


IMAGE_CACHE_SUFFIX = ".images"


@dataclass
class SiteData:
    """One client's prepared splits.

    Attributes:
        site: The site's name.
        splits: ``train``, ``val`` and ``test``, their images streamed (empty where the site's
            own DataModule reads its data: ``task: lightning``).
        counts: What the site reports (``counts.json``): ``train``, ``val``, ``test`` sizes ...
        directory: The client's data folder.
        datamodule: The site's own LightningDataModule (``task: lightning``), else None.
        embedding_cache: What frozen towers computed on these splits, kept in memory as long as
            the splits are and on disk in ``directory/embeddings`` (:mod:`fedvlm.models.frozen`).
    """

    site: str
    splits: dict[str, SiteSplit]
    counts: dict[str, Any]
    directory: Path
    datamodule: L.LightningDataModule | None = None
    embedding_cache: EmbeddingCache = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.embedding_cache = EmbeddingCache(self.directory / "embeddings")

    @property
    def train(self) -> SiteSplit:
        return self.splits["train"]

    @property
    def val(self) -> SiteSplit:
        return self.splits["val"]

    @property
    def test(self) -> SiteSplit:
        return self.splits["test"]


class SplitWriter:
    """Writes one split of a client's folder: the tensors, and the images as the site-local
    cache (one image decoded at a time) or as a list of the source's files.

    ``add`` may be called once per source (the pooled baseline adds every site's rows).
    """

    def __init__(self, directory: Path, split: str, spec: ImageSpec, cache: bool) -> None:
        self.directory, self.split, self.spec, self.cache = directory, split, spec, cache
        self.parts: list[Bundle] = []
        self.sources: list[str] = []
        self.writer = ImageCacheWriter(directory / f"{split}{IMAGE_CACHE_SUFFIX}", spec) if cache else None

    def add(
        self, records: SiteRecords, rows: np.ndarray, tokenizer: PreTrainedTokenizerBase | None, first_index: int = 0
    ) -> None:
        """Tensorise ``rows`` of ``records`` and append their images; sample indices start at
        ``first_index`` (the pooled baseline numbers each site's rows after the previous sites').

        Raises:
            DataError: Naming the image file that is missing or cannot be decoded.
        """
        if records.image_spec != self.spec:
            raise ConfigError(f"internal: records shaped {records.image_spec}, split written as {self.spec}")
        tensors = records.tensors(rows, tokenizer)
        tensors["index"] = tensors["index"] + first_index
        self.parts.append(tensors)
        for image in records.images(rows):
            if self.writer is not None:
                self.writer.write(image)  # decoded here, once: every image is validated up front
            elif isinstance(image, np.ndarray):
                raise DataError("data.image_cache=false needs image files; this source has none (set it true)")
            elif not Path(image).is_file():
                raise DataError(f"image file not found: {image}")
            else:
                self.sources.append(str(Path(image).resolve()))

    def finish(self) -> tuple[SiteSplit, dict[str, Any]]:
        """Close the split: ``(the split, its entry in images.json)``."""
        # report groups are numbered per split and part: offset them so that two sites' never collide
        tensors = concat_tensors(self.parts, offset=["report_group"]) if len(self.parts) > 1 else self.parts[0]
        save_bundle(tensors, self.directory / f"{self.split}.pt")
        count = bundle_size(tensors)
        if self.writer is not None:
            self.writer.close()
            entry: dict[str, Any] = {"count": count, "cache": self.writer.path.name}
            images = SplitImages(self.spec, count, cache=self.writer.path)
        else:
            entry = {"count": count, "sources": self.sources}
            images = SplitImages(self.spec, count, sources=self.sources)
        return SiteSplit(tensors, images), entry

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def write_splits(
    directory: Path,
    spec: ImageSpec,
    cache: bool,
    sources: list[tuple[SiteRecords, dict[str, np.ndarray]]],
    tokenizer: PreTrainedTokenizerBase | None,
) -> dict[str, SiteSplit]:
    """Write ``train``/``val``/``test`` of ``sources`` (records and their rows per split) into
    ``directory``, and ``images.json`` saying where each split's images are."""
    directory.mkdir(parents=True, exist_ok=True)
    writers = {split: SplitWriter(directory, split, spec, cache) for split in SPLITS}
    try:
        first_index = 0
        for records, rows in sources:
            for split in SPLITS:
                writers[split].add(records, rows[split], tokenizer, first_index)
            first_index += len(records.index)  # the same shift in every split: indices stay unique
        finished = {split: writer.finish() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    index = {"spec": spec.to_json(), "splits": {split: entry for split, (_, entry) in finished.items()}}
    (directory / IMAGES_FILE).write_text(json.dumps(index, indent=1))
    return {split: data for split, (data, _) in finished.items()}


def save_site_data(
    directory: Path, site: str, splits: dict[str, SiteSplit], counts: dict[str, Any], fingerprint: str
) -> SiteData:
    counts = {"site": site, **counts, "fingerprint": fingerprint}
    tmp = directory / (COUNTS_FILE + ".tmp")
    tmp.write_text(json.dumps(counts, indent=2))
    tmp.replace(directory / COUNTS_FILE)  # written last: its presence means the splits are complete
    return SiteData(site, splits, counts, directory)


def load_site_data(directory: Path) -> SiteData:
    """A client's prepared splits, as :func:`ensure_site_data` left them.

    Raises:
        DataError: If the folder was never prepared (naming it).
    """
    path = directory / COUNTS_FILE
    if not path.is_file():
        raise DataError(f"{directory} holds no prepared site data (no {COUNTS_FILE}): the client has not run yet")
    counts = json.loads(path.read_text())
    images_path = directory / IMAGES_FILE
    if not images_path.is_file():
        raise DataError(f"{directory} was prepared by an older fedvlm (no {IMAGES_FILE}): delete it to prepare again")
    images = json.loads(images_path.read_text())
    spec = ImageSpec.from_json(images["spec"])
    splits = {}
    for split in SPLITS:
        entry = images["splits"][split]
        cache = directory / entry["cache"] if "cache" in entry else None
        rows = SplitImages(spec, int(entry["count"]), cache=cache, sources=entry.get("sources"))
        splits[split] = SiteSplit(load_bundle(directory / f"{split}.pt"), rows)
    return SiteData(str(counts["site"]), splits, counts, directory)


def reusable_site_data(directory: Path, fingerprint: str) -> SiteData | None:
    """The splits already prepared in ``directory`` when their fingerprint is ``fingerprint``."""
    path = directory / COUNTS_FILE
    if path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint:
        return load_site_data(directory)
    return None


def site_data_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """``(partition id, folder)`` of every client that prepared data under ``run_dir`` (simulation)."""
    folders = RunLayout(run_dir).client_data_folders()
    return [(pid, folder) for pid, folder in folders if (folder / COUNTS_FILE).is_file()]


def client_site(run_dir: Path, partition_id: int) -> SiteData:
    """Client ``partition_id``'s prepared splits (its folder in the run directory)."""
    return load_site_data(RunLayout(run_dir).client_data(partition_id))


def client_bundle(run_dir: Path, partition_id: int) -> SiteSplit:
    """All of one client's data (local train + validation + test), images streamed."""
    splits = client_site(run_dir, partition_id).splits
    return concat_splits([splits[split] for split in ("train", "val", "test")])


def run_sites(run_dir: Path) -> list[tuple[int, SiteData]]:
    """``(partition id, prepared splits)`` of every client of the run, loaded one at a time.

    Raises:
        ConfigError: If no client has prepared data (the run never started).
    """
    folders = site_data_folders(run_dir)
    if not folders:
        raise ConfigError(f"{run_dir} has no prepared site data (clients/client_NNN/data): was the run started?")
    return [(pid, load_site_data(folder)) for pid, folder in folders]
