"""One site's prepared data as a LightningDataModule."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from fedvlm.data.prepared import Samples, make_loader

Loader = DataLoader[dict[str, torch.Tensor]]


class SiteDataModule(L.LightningDataModule):
    """A site's ``train``/``val``/``test`` splits as DataLoaders; a streamed split's images are
    read (or decoded) one at a time in the loader, so memory does not grow with the site's size.

    Args:
        splits: ``train``, ``val`` and ``test`` (streamed :class:`~fedvlm.data.streaming.SiteSplit`
            or in-memory bundles).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (``trainer.num_workers``).
        augment: ``data.augment``, applied to the training split only.
        seed: Seeds the training order (one value per client and round: a round is reproducible).

    Example:
        >>> bundle = {"index": torch.arange(5), "image": torch.zeros(5, 3, 2, 2, dtype=torch.uint8)}
        >>> module = SiteDataModule({"train": bundle, "val": bundle, "test": bundle}, batch_size=2)
        >>> [len(batch["index"]) for batch in module.train_dataloader()]
        [2, 2, 1]
    """

    def __init__(
        self, splits: Mapping[str, Samples], batch_size: int, num_workers: int = 0, augment: str = "none", seed: int = 0
    ) -> None:
        super().__init__()
        self.splits = dict(splits)
        self.batch_size, self.num_workers, self.augment, self.seed = batch_size, num_workers, augment, seed

    @override
    def train_dataloader(self) -> Loader:
        return make_loader(
            self.splits["train"],
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
            augment=self.augment,
        )

    @override
    def val_dataloader(self) -> Loader:
        return make_loader(self.splits["val"], self.batch_size, shuffle=False, num_workers=self.num_workers)

    @override
    def test_dataloader(self) -> Loader:
        return make_loader(self.splits["test"], self.batch_size, shuffle=False, num_workers=self.num_workers)


__all__ = ["SiteDataModule"]
