"""Prepared bundles: tensors from records, atomic save/load, the dataset and augmentation."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedvlm.data.prepared import BundleDataset, load_bundle, save_bundle, subset
from fedvlm.errors import DataError
from fedvlm.models.tokenizer import build_word_tokenizer
from fedvlm.tasks.leukemia.records import LeukemiaRecord, prepare_bundle


def records() -> list[LeukemiaRecord]:
    rng = np.random.default_rng(0)
    return [
        LeukemiaRecord(
            rng.integers(0, 255, (12, 12, 3), dtype=np.uint8), f"blasts {i}0%", i % 2, 1 if i % 2 else None, f"p{i}"
        )
        for i in range(4)
    ]


def test_prepare_save_load_round_trip(tmp_path: Path) -> None:
    data = records()
    tokenizer = build_word_tokenizer(r.report for r in data)
    bundle = prepare_bundle(data, tokenizer, image_size=8, max_text_length=6)
    assert bundle["image"].shape == (4, 3, 8, 8) and bundle["input_ids"].shape == (4, 6)
    assert bundle["stage"].tolist() == [-1, 1, -1, 1] and bundle["leukemia"].tolist() == [0, 1, 0, 1]
    save_bundle(subset(bundle, [1, 3]), tmp_path / "shard.pt")
    loaded = load_bundle(tmp_path / "shard.pt")
    for key, value in loaded.items():
        assert torch.equal(value, bundle[key][[1, 3]])
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_or_corrupt_shards_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.pt is missing"):
        load_bundle(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="bad.pt is unreadable"):
        load_bundle(tmp_path / "bad.pt")


def test_dihedral_augmentation_only_moves_pixels() -> None:
    bundle = prepare_bundle(records(), None, image_size=8, max_text_length=6)
    plain, augmented = BundleDataset(bundle), BundleDataset(bundle, augment="dihedral")
    torch.manual_seed(0)
    image = plain[0]["image"]
    symmetries = [torch.rot90(im, k, dims=(-2, -1)) for im in (image, image.flip(-1)) for k in range(4)]
    seen = set()
    for _ in range(64):
        out = augmented[0]
        matches = [i for i, sym in enumerate(symmetries) if torch.equal(out["image"], sym)]
        assert len(matches) >= 1 and out["leukemia"] == plain[0]["leukemia"]
        seen.add(matches[0])
    assert len(seen) == 8
    with pytest.raises(ValueError, match="augment='mixup' is not one of"):
        BundleDataset(bundle, augment="mixup")


def test_tokenising_in_chunks_gives_the_tokens_of_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedvlm.data.prepared as prepared
    from fedvlm.models.tokenizer import build_word_tokenizer

    texts = [f"report {i} " + "word " * (i % 7) for i in range(11)]
    tokenizer = build_word_tokenizer(iter(texts))
    whole = prepared.tokenize(tokenizer, texts, 8)
    monkeypatch.setattr(prepared, "TOKENIZE_CHUNK", 3)
    chunked = prepared.tokenize(tokenizer, texts, 8)
    assert all(torch.equal(whole[key], chunked[key]) for key in whole) and whole["input_ids"].shape == (11, 8)
    assert prepared.tokenize(tokenizer, [], 8)["input_ids"].shape == (0, 8)
