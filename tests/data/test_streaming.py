"""Streamed site splits: the same tensors as in-memory bundles, images read one row at a time."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedvlm.config import load_config
from fedvlm.data.prepared import make_loader
from fedvlm.data.streaming import ImageSpec, SiteSplit, SplitImages, concat_splits
from fedvlm.errors import DataError
from fedvlm.tasks import get_task
from fedvlm.tasks.base import run_tokenizer
from fedvlm.tasks.cxr.records import prepare_cxr_bundle
from fedvlm.tasks.leukemia.records import prepare_bundle
from fedvlm.tasks.site import ensure_site_data
from fedvlm.tasks.site_store import SPLITS, SiteData

LEUKEMIA = [
    "federation.num_clients=1",
    "data.image_size=16",
    "data.max_text_length=16",
    "data.test_fraction=0.25",
    "data.val_fraction=0.25",
]


def leukemia_manifest(root: Path, count: int = 16) -> Path:
    """A leukemia manifest with PNG smears of odd sizes (so that every image is resized)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (root / "manifest.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "report", "leukemia", "stage", "patient"])
        for i in range(count):
            label = int(i % 2)
            pixels = rng.integers(0, 255, (20 + i, 27, 3), dtype=np.uint8)
            (root / "smears").mkdir(exist_ok=True)
            Image.fromarray(pixels).save(root / "smears" / f"s{i:02d}.png")
            report = f"blasts seen, stage {['i', 'ii', 'iii', 'iv'][i % 4]}" if label else "no blasts seen"
            writer.writerow(
                [f"smears/s{i:02d}.png", report, label, ["I", "II", "III", "IV"][i % 4] if label else "", i]
            )
    return root / "manifest.csv"


def prepare(task_name: str, recipe: str, overrides: list[str], run_dir: Path) -> tuple[SiteData, object]:
    cfg = load_config(recipe, overrides)
    task = get_task(task_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    task.prepare(cfg, run_dir)
    site = ensure_site_data(task.read_site, cfg, run_dir, 0, lambda: run_tokenizer(cfg, run_dir))
    return site, task.read_site(cfg)


def assert_same_batches(streamed: SiteSplit, bundle: dict[str, torch.Tensor], num_workers: int = 0) -> None:
    left = list(make_loader(streamed, 4, shuffle=False, num_workers=num_workers))
    right = list(make_loader(bundle, 4, shuffle=False))
    assert len(left) == len(right) > 0
    for a, b in zip(left, right, strict=True):
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("cache", [True, False])
def test_streamed_leukemia_splits_yield_the_tensors_of_in_memory_bundles(tmp_path: Path, cache: bool) -> None:
    manifest = leukemia_manifest(tmp_path / "site")
    overrides = [*LEUKEMIA, "data.format=manifest", f"data.root={manifest}", f"data.image_cache={cache}"]
    site, records = prepare("leukemia", "leukemia_demo", overrides, tmp_path / "run")
    tokenizer = run_tokenizer(load_config("leukemia_demo", overrides), tmp_path / "run")
    cached = sorted(p.name for p in site.directory.glob("*.images"))
    assert cached == (["test.images", "train.images", "val.images"] if cache else [])
    for split in SPLITS:
        rows = site.splits[split]["index"].numpy()
        expected = prepare_bundle(records.records(rows), tokenizer, 16, 16, indices=rows.tolist())  # type: ignore[attr-defined]
        assert_same_batches(site.splits[split], expected)


def test_streamed_cxr_splits_yield_the_tensors_of_in_memory_bundles(tmp_path: Path) -> None:
    from fedvlm.tasks.cxr.manifest import write_cxr_manifest
    from fedvlm.tasks.cxr.synthetic import SynthCxrConfig, generate_cxr

    manifest = write_cxr_manifest(
        generate_cxr(SynthCxrConfig(n=24, image_size=40, num_sites=1, seed=3)), tmp_path / "cxr"
    )
    overrides = [
        "federation.num_clients=1",
        "data.image_size=16",
        "data.format=manifest",
        f"data.root={manifest}",
        "data.image_cache=false",
    ]
    site, records = prepare("cxr", "cxr_demo", overrides, tmp_path / "run")
    tokenizer = run_tokenizer(load_config("cxr_demo", overrides), tmp_path / "run")
    assert site.train.images[0].shape == (1, 16, 16)
    for split in SPLITS:
        rows = site.splits[split]["index"].numpy()
        chosen = records.records(rows)  # type: ignore[attr-defined]
        expected = prepare_cxr_bundle(chosen, tokenizer, 16, 96, indices=rows.tolist(), equalize=True)
        assert_same_batches(site.splits[split], expected)


@pytest.mark.parametrize("cache", [True, False])
def test_dataloader_workers_read_the_same_images(tmp_path: Path, cache: bool) -> None:
    manifest = leukemia_manifest(tmp_path / "site")
    overrides = [*LEUKEMIA, "data.format=manifest", f"data.root={manifest}", f"data.image_cache={cache}"]
    site, _ = prepare("leukemia", "leukemia_demo", overrides, tmp_path / "run")
    in_memory = site.train.take(range(len(site.train)))
    assert_same_batches(site.train, in_memory, num_workers=2)  # each worker opens the cache itself


def test_a_truncated_cache_is_refused_naming_the_file(tmp_path: Path) -> None:
    spec = ImageSpec(1, 2)
    path = tmp_path / "train.images"
    path.write_bytes(bytes(7))  # two rows need 8 bytes
    with pytest.raises(DataError, match=r"train\.images is 7 bytes, expected 8"):
        SplitImages(spec, 2, cache=path)


def test_without_cache_a_missing_image_names_the_site_and_the_file(tmp_path: Path) -> None:
    manifest = leukemia_manifest(tmp_path / "site")
    (tmp_path / "site" / "smears" / "s05.png").unlink()
    overrides = [*LEUKEMIA, "data.format=manifest", f"data.root={manifest}", "data.image_cache=false"]
    with pytest.raises(DataError, match=r"s05\.png"):
        prepare("leukemia", "leukemia_demo", overrides, tmp_path / "run")


def test_concatenated_splits_keep_their_report_groups_apart() -> None:
    def split(groups: list[int], start: int) -> SiteSplit:
        images = torch.arange(len(groups), dtype=torch.uint8).view(-1, 1, 1, 1) + start
        tensors = {"index": torch.arange(start, start + len(groups)), "report_group": torch.tensor(groups)}
        return SiteSplit(tensors, list(images))  # a list of tensors is a sequence of image rows

    joined = concat_splits([split([0, 1, 0], 0), split([0], 10), split([0, 1], 20)])
    assert joined["report_group"].tolist() == [0, 1, 0, 2, 3, 4]
    assert joined["index"].tolist() == [0, 1, 2, 10, 20, 21]
    assert [int(joined.images[r]) for r in range(len(joined))] == [0, 1, 2, 10, 20, 21]
    assert torch.equal(joined.take([3, 5])["image"].flatten(), torch.tensor([10, 21], dtype=torch.uint8))


def test_a_site_too_small_to_hold_out_keeps_empty_validation_and_test_splits(tmp_path: Path) -> None:
    manifest = leukemia_manifest(tmp_path / "site", count=3)  # fewer than four patients: nothing held out
    site, _ = prepare(
        "leukemia", "leukemia_demo", [*LEUKEMIA, "data.format=manifest", f"data.root={manifest}"], tmp_path / "run"
    )
    assert [len(site.splits[s]) for s in SPLITS] == [3, 0, 0]
    assert site.test["input_ids"].shape == (0, 16) and list(make_loader(site.test, 4, shuffle=False)) == []
