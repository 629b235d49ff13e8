"""What the synthetic generators of both tasks share: the checks of their sizes, report
tokenisation as a BERT pre-tokenizer does it (for their vocabularies), and checked sample indices
(a generator can render any subset of its samples, each from its own random stream)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from fedvlm.errors import ConfigError


def check_generator_sizes(n: int, seed: int, image_size: int, num_sites: int) -> None:
    """Refuse a generator's sizes out of range: ``n ≥ 0`` samples, ``seed ≥ 0``, images of
    ``32..512`` pixels, ``1..100`` sites.

    Raises:
        ConfigError: Naming the first setting out of range.

    Example:
        >>> check_generator_sizes(10, 0, 16, 2)
        Traceback (most recent call last):
        ...
        fedvlm.errors.ConfigError: image_size must be in 32..512, got 16
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if not 32 <= image_size <= 512:
        raise ConfigError(f"image_size must be in 32..512, got {image_size}")
    if not 1 <= num_sites <= 100:
        raise ConfigError(f"num_sites must be in 1..100, got {num_sites}")


_TOKEN_PATTERN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def report_tokens(text: str) -> list[str]:
    """Lower-case ``text`` and split it on whitespace and punctuation (each punctuation mark
    is a token), as a BERT pre-tokenizer does on ASCII text.

    Example:
        >>> report_tokens("Blasts 45%; WBC 12.3 x10^9/L.")
        ['blasts', '45', '%', ';', 'wbc', '12', '.', '3', 'x10', '^', '9', '/', 'l', '.']
    """
    return _TOKEN_PATTERN.findall(text.lower())


def checked_indices(indices: Sequence[int] | None, n: int, what: str) -> list[int]:
    """``indices`` as plain ints (``0..n-1`` when ``None``), each checked against ``n``.

    Raises:
        IndexError: Naming the first out-of-range ``what`` indices.
    """
    if indices is None:
        return list(range(n))
    chosen = [int(index) for index in indices]
    out_of_range = [index for index in chosen if not 0 <= index < n]
    if out_of_range:
        raise IndexError(f"{what} indices {out_of_range[:5]} out of range for n={n}")
    return chosen
