"""Frozen towers: held in eval mode, and their embeddings computed once per site.

A pretrained encoder whose every parameter is frozen (``model.adapter`` with empty targets, or the
first ``federation.freeze_encoders_rounds``) is a fixed function: it must normalise with its
running statistics rather than the batch's (BatchNorm in training mode mixes the samples of a
batch, which DP-SGD cannot allow, and would rewrite statistics that then travel) and it must not
drop units at random. :func:`hold_frozen_in_eval` is what the encoders' forward starts with.

A fixed function of the input can be cached: the layers above a frozen tower train for many
rounds on the same records, so :class:`EmbeddingCache` keeps each record's embedding by the
content of its input (and the tower's weights). The cache belongs to one site's data
(:class:`fedvlm.tasks.site_store.SiteData`), so it lives exactly as long as that site's splits do
in the client process, and never holds two sites' records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def is_frozen(module: nn.Module) -> bool:
    """True when ``module`` has parameters and none of them trains.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> is_frozen(layer), is_frozen(layer.requires_grad_(False)), is_frozen(nn.ReLU())
        (False, True, False)
    """
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def frozen_batchnorms(module: nn.Module) -> list[str]:
    """Names of the BatchNorm layers of ``module`` whose affine parameters are all frozen."""
    return [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and is_frozen(child)
    ]


def hold_frozen_in_eval(module: nn.Module) -> None:
    """Put ``module`` in eval mode if it is frozen as a whole, else each frozen BatchNorm in it.

    Called by the encoders at every forward in training mode, so frozen parts stay frozen whatever
    mode Lightning or the caller left them in.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
        >>> _ = net[1].requires_grad_(False)
        >>> hold_frozen_in_eval(net.train())
        >>> [m.training for m in net]
        [True, False, True]
        >>> hold_frozen_in_eval(net.requires_grad_(False).train())
        >>> [m.training for m in net]
        [False, False, False]
    """
    if is_frozen(module):
        module.eval()
        return
    for name in frozen_batchnorms(module):
        module.get_submodule(name).eval()


def update_digest(digest: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed each ``(name, tensor)``'s name and raw bytes to a ``hashlib`` object, in order."""
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())


def tower_digest(module: nn.Module) -> bytes:
    """A digest of every tensor in ``module``'s state dict (names and values)."""
    digest = hashlib.blake2b(digest_size=16)
    update_digest(digest, module.state_dict().items())
    return digest.digest()


class EmbeddingCache:
    """Embeddings of frozen towers, by tower and input content, optionally kept on disk.

    Args:
        directory: Where :meth:`save` writes one file per tower (``<digest>.pt``) and
            :meth:`embed` reads it back: the site's own data folder, so a fresh client process
            (each round under the deployment engine, or a simulation actor that served another
            site meanwhile) starts from what this site computed before. None keeps them in memory.
        max_entries: Entries kept at most (the oldest are dropped first).

    Example:
        >>> cache, calls = EmbeddingCache(), []
        >>> def embed(rows):
        ...     calls.append(len(rows))
        ...     return rows.float() * 2
        >>> rows = torch.tensor([[1], [2]])
        >>> keys = [row.numpy().tobytes() for row in rows]
        >>> cache.embed(b"tower", keys, lambda index: embed(rows[index])).tolist()
        [[2.0], [4.0]]
        >>> _ = cache.embed(b"tower", keys[::-1], lambda index: embed(rows.flip(0)[index]))
        >>> calls, len(cache)
        ([2], 2)
    """

    def __init__(self, directory: Path | None = None, max_entries: int = 200_000) -> None:
        self.directory, self.max_entries = directory, max_entries
        self._entries: dict[bytes, torch.Tensor] = {}
        self._towers: dict[bytes, set[bytes]] = {}  # tower digest → its keys
        self._unsaved: set[bytes] = set()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def embed(
        self,
        tower: bytes,
        row_keys: Sequence[bytes],
        compute: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """The embeddings ``[B, D]`` of a batch whose rows have contents ``row_keys``, on ``device``.

        Args:
            tower: :func:`tower_digest` of the frozen tower.
            row_keys: Per row, the bytes that determine its embedding.
            compute: Maps a LongTensor of row indices to those rows' embeddings (called once,
                for the rows not cached).
        """
        if tower not in self._towers:
            self._towers[tower] = set()
            self._load(tower)
        keys = [hashlib.blake2b(tower + row, digest_size=16).digest() for row in row_keys]
        missing = [i for i, key in enumerate(keys) if key not in self._entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if not missing:
            return torch.stack([self._entries[key] for key in keys]).to(device)
        computed = compute(torch.tensor(missing, dtype=torch.long)).detach()
        for i, row in zip(missing, computed, strict=True):
            self._entries[keys[i]] = row.cpu().clone()
            self._towers[tower].add(keys[i])
            self._unsaved.add(tower)
        embeddings = torch.stack([self._entries[key] for key in keys]).to(device or computed.device)
        while len(self._entries) > self.max_entries:
            oldest = next(iter(self._entries))
            del self._entries[oldest]
            for owned in self._towers.values():
                owned.discard(oldest)
        return embeddings

    def save(self) -> None:
        """Write the towers' entries computed since the last save (no-op without a directory)."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for tower in sorted(self._unsaved):
            keys = sorted(self._towers[tower])
            if not keys:
                continue
            path = self.directory / f"{tower.hex()}.pt"
            partial = path.with_suffix(".pt.partial")
            torch.save({"keys": keys, "embeddings": torch.stack([self._entries[k] for k in keys])}, partial)
            partial.replace(path)  # a reader never sees half a file
        self._unsaved.clear()

    def _load(self, tower: bytes) -> None:
        if self.directory is None:
            return
        path = self.directory / f"{tower.hex()}.pt"
        if not path.is_file():
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for key, row in zip(saved["keys"], saved["embeddings"], strict=True):
            self._entries[key] = row
            self._towers[tower].add(key)


class FrozenTower(nn.Module):
    """Base of the encoders: frozen → eval mode, and embeddings from an attached cache.

    Frozen parts are put in eval mode at every forward in training mode (Lightning 2.6 leaves
    each submodule's mode as it finds it instead of calling ``train()``). ``embedding_cache`` is
    None until :func:`attach_embedding_cache` gives the tower its site's cache; only a frozen
    tower in eval mode uses it. The weights' digest is recomputed after ``load_state_dict``.
    """

    embedding_cache: EmbeddingCache | None = None

    def __init__(self) -> None:
        super().__init__()
        self._digest: bytes | None = None
        self.register_load_state_dict_post_hook(FrozenTower._weights_loaded)

    @staticmethod
    def _weights_loaded(tower: nn.Module, _incompatible: object) -> None:
        if isinstance(tower, FrozenTower):
            tower._digest = None

    def hold_frozen(self) -> None:
        """What every forward starts with: in training mode, put the frozen parts in eval mode."""
        if self.training:
            hold_frozen_in_eval(self)

    def cached(
        self,
        row_keys: Callable[[], Sequence[bytes]],
        compute: Callable[[torch.Tensor | None], torch.Tensor],
        device: torch.device,
        inputs_need_grad: bool = False,
    ) -> torch.Tensor:
        """``compute(None)`` (the whole batch), or through the cache when the tower is frozen.

        Args:
            row_keys: The batch's per-row content bytes (only called when the cache is used).
            compute: Row indices (None: all rows) → embeddings.
            device: Where the embeddings go (the inputs' device).
            inputs_need_grad: The inputs require gradients (saliency such as Grad-CAM, whose hooks
                inside the tower must fire): never cached.
        """
        self.hold_frozen()
        if self.embedding_cache is None or self.training or inputs_need_grad or not is_frozen(self):
            return compute(None)
        if self._digest is None:
            self._digest = tower_digest(self)
        return self.embedding_cache.embed(self._digest, row_keys(), compute, device)


def held_batchnorms(module: nn.Module) -> list[str]:
    """Names of the frozen BatchNorm layers in ``module`` that a :class:`FrozenTower` holds in eval
    mode: they neither mix a batch's samples nor change their running statistics."""
    held = []
    for name, child in module.named_modules():
        if isinstance(child, FrozenTower):
            prefix = f"{name}." if name else ""
            held += [f"{prefix}{bn}" for bn in frozen_batchnorms(child)]
    return held


def attach_embedding_cache(module: nn.Module, cache: EmbeddingCache | None) -> int:
    """Give every :class:`FrozenTower` in ``module`` the ``cache``; returns how many there are."""
    towers = [child for child in module.modules() if isinstance(child, FrozenTower)]
    for tower in towers:
        tower.embedding_cache = cache
    return len(towers)
