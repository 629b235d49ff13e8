"""Data stay on site: three hospitals in three layouts, each read only by its own client."""

from __future__ import annotations

import builtins
import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fedvlm.config import load_config
from fedvlm.data.prepared import make_loader
from fedvlm.data.sites import client_source, read_site_entries
from fedvlm.errors import ConfigError, DataError
from fedvlm.tasks import get_task
from fedvlm.tasks.base import run_tokenizer
from fedvlm.tasks.site import ensure_site_data

STAGES = ("I", "II", "III", "IV")
SITE_OVERRIDES = [
    "data.image_size=32",
    "data.max_text_length=32",
    "trainer.batch_size=8",
    "trainer.local_epochs=1",
    "data.test_fraction=0.25",
    "data.val_fraction=0.25",
]


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)


def _report(label: int, index: int) -> tuple[str, str]:
    if not label:
        return "no blasts seen on the smear", ""
    stage = STAGES[index % 4]
    return f"blasts seen on the smear, stage {stage.lower()}", stage


def _reports_csv(path: Path, rows: list[tuple[str, int, int]]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "report", "stage"])
        for name, label, index in rows:
            report, stage = _report(label, index)
            writer.writerow([name, report, stage])


def make_all_idb2(root: Path, count: int) -> dict[str, str]:
    """ALL-IDB2: single-cell crops ``img/ImNNN_L.tif`` and a reports CSV."""
    rows = [(f"Im{i:03d}_{i % 2}.tif", i % 2, i) for i in range(1, count + 1)]
    for name, _, index in rows:
        _image(root / "ALL_IDB2" / "img" / name, index)
    _reports_csv(root / "reports.csv", rows)
    return {"format": "all_idb2", "root": str(root / "ALL_IDB2"), "reports": str(root / "reports.csv")}


def make_all_idb1(root: Path, count: int) -> dict[str, str]:
    """ALL-IDB1: smears ``im/ImNNN_L.jpg`` with blast centres in ``xyc/``, and a reports CSV."""
    rows = [(f"Im{i:03d}_{(i + 1) % 2}.jpg", (i + 1) % 2, i) for i in range(1, count + 1)]
    for name, label, index in rows:
        _image(root / "ALL_IDB1" / "im" / name, 100 + index)
        xyc = root / "ALL_IDB1" / "xyc" / name.replace(".jpg", ".xyc")
        xyc.parent.mkdir(parents=True, exist_ok=True)
        xyc.write_text("3 4\n" if label else "")
    _reports_csv(root / "reports.csv", rows)
    return {"format": "all_idb1", "root": str(root / "ALL_IDB1"), "reports": str(root / "reports.csv")}


def make_manifest(root: Path, count: int) -> dict[str, str]:
    """A manifest CSV (image, report, leukemia, stage) beside its PNG smears."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "manifest.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "report", "leukemia", "stage", "patient"])
        for i in range(count):
            label = int(i % 3 != 0)
            _image(root / "smears" / f"s{i:03d}.png", 200 + i)
            report, stage = _report(label, i)
            writer.writerow([f"smears/s{i:03d}.png", report, label, stage, f"c{i:03d}"])
    return {"format": "manifest", "root": str(root / "manifest.csv")}


SIZES = {"hospital_a": 12, "hospital_b": 14, "hospital_c": 16}


@pytest.fixture
def three_sites(tmp_path: Path) -> Path:
    """``sites.yaml`` naming three hospitals, each in its own folder and layout."""
    entries = [
        {"name": "hospital_a", **make_all_idb2(tmp_path / "a", SIZES["hospital_a"])},
        {"name": "hospital_b", **make_all_idb1(tmp_path / "b", SIZES["hospital_b"])},
        {"name": "hospital_c", **make_manifest(tmp_path / "c", SIZES["hospital_c"])},
    ]
    path = tmp_path / "sites.yaml"
    path.write_text("".join(f"- {json.dumps(entry)}\n" for entry in entries))
    return path


@contextmanager
def recorded_opens() -> Iterator[list[Path]]:
    """Every file opened through ``open`` (Python, pathlib, PIL) while the block runs."""
    opened: list[Path] = []
    original = builtins.open

    def recording(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | Path):
            opened.append(Path(file).resolve())
        return original(file, *args, **kwargs)

    builtins.open, io.open = recording, recording  # type: ignore[assignment]
    try:
        yield opened
    finally:
        builtins.open, io.open = original, original  # type: ignore[assignment]


def site_roots(sites_file: Path) -> dict[str, Path]:
    entries = read_site_entries(sites_file)
    assert entries is not None
    return {entry["name"]: Path(entry["root"]).resolve().parent for entry in entries}


def _inside(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


def test_each_client_reads_only_its_own_site_and_the_coordinator_none(three_sites: Path, tmp_path: Path) -> None:
    cfg = load_config("leukemia_demo", [*SITE_OVERRIDES, f"data.sites={three_sites}"])
    assert cfg.federation.num_clients == 3  # one client per site
    roots = site_roots(three_sites)
    task = get_task("leukemia")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with recorded_opens() as opened:
        task.prepare(cfg, run_dir)
    assert not [p for p in opened if any(_inside(p, root) for root in roots.values())]  # the coordinator reads none
    for pid, name in enumerate(roots):
        with recorded_opens() as opened:
            site = ensure_site_data(task.read_site, cfg, run_dir, pid, lambda: run_tokenizer(cfg, run_dir))
        data_files = [p for p in opened if any(_inside(p, root) for root in roots.values())]
        assert data_files and all(_inside(p, roots[name]) for p in data_files), name
        assert site.site == name
        # the counts a site reports are its files: every image lands in exactly one split
        assert site.counts["train"] + site.counts["val"] + site.counts["test"] == SIZES[name]
        assert site.counts["test"] > 0 and site.counts["val"] > 0
        indices = torch.cat([site.splits[s]["index"] for s in ("train", "val", "test")])
        assert sorted(indices.tolist()) == list(range(SIZES[name]))
        assert (run_dir / "clients" / f"client_{pid:03d}" / "data" / "counts.json").is_file()
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["meta.json"]  # nothing per sample


def test_the_tokenizer_is_fixed_and_never_built_from_the_reports(three_sites: Path, tmp_path: Path) -> None:
    cfg = load_config("leukemia_demo", [*SITE_OVERRIDES, f"data.sites={three_sites}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    meta = get_task("leukemia").prepare(cfg, run_dir)
    assert meta["vocab_size"] == 30522  # the shipped BERT-base uncased WordPiece vocabulary
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    from fedvlm.tasks.leukemia.synthetic import report_vocabulary

    demo = load_config("leukemia_demo", SITE_OVERRIDES)
    assert get_task("leukemia").prepare(demo, synthetic)["vocab_size"] == len(report_vocabulary()) + 5


def test_a_site_with_bad_input_is_named(three_sites: Path, tmp_path: Path) -> None:
    roots = site_roots(three_sites)
    broken = next((roots["hospital_b"] / "ALL_IDB1" / "im").glob("*.jpg"))
    broken.write_bytes(b"not a jpeg")
    cfg = load_config("leukemia_demo", [*SITE_OVERRIDES, f"data.sites={three_sites}"])
    task = get_task("leukemia")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    task.prepare(cfg, run_dir)
    ensure_site_data(task.read_site, cfg, run_dir, 0, lambda: run_tokenizer(cfg, run_dir))  # hospital_a is fine
    with pytest.raises(DataError, match=rf"site hospital_b: .*{broken.name}"):
        ensure_site_data(task.read_site, cfg, run_dir, 1, lambda: run_tokenizer(cfg, run_dir))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "a", "root": "/x"}, {"name": "a", "root": "/y"}], "two sites are named 'a'"),
        ([{"name": "a b", "root": "/x"}], "must be a word"),
        ([{"name": "a", "image_size": 64}], r"data.sites\[0\] \(a\): image_size is not a site key"),
        ([], "non-empty list"),
    ],
)
def test_malformed_site_lists_are_refused_naming_the_entry(entries: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_site_entries(entries)


def test_a_supernode_names_its_own_data_in_its_node_config(tmp_path: Path) -> None:
    site = make_all_idb2(tmp_path / "a", 8)
    cfg = load_config("leukemia_demo", SITE_OVERRIDES)
    node_config = {
        "partition-id": 0,
        "site-name": "hospital_a",
        "data-format": "all_idb2",
        "data-root": site["root"],
        "data-reports": site["reports"],
    }
    source = client_source(cfg, 0, node_config)
    assert source.site == "hospital_a" and source.partition is None
    assert (source.cfg.data.format, source.cfg.data.root) == ("all_idb2", site["root"])
    with pytest.raises(ConfigError, match="only in part"):
        client_source(cfg, 0, {"site-name": "hospital_a"})


@pytest.mark.slow
def test_a_three_site_federation_trains_and_scores_on_the_union_of_the_sites_test_splits(
    three_sites: Path, tmp_path: Path
) -> None:
    from fedvlm.cli import main
    from fedvlm.runs import read_metrics
    from fedvlm.tasks.leukemia.module import LeukemiaModule
    from fedvlm.tasks.site_store import client_site

    run_dir = tmp_path / "run"
    overrides = [*SITE_OVERRIDES, f"data.sites={three_sites}", "federation.rounds=1"]
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), *overrides]) == 0
    partition = json.loads((run_dir / "partition.json").read_text())
    assert [(c["site"], c["num_samples"]) for c in partition["clients"]] == list(SIZES.items())
    (row,) = read_metrics(run_dir)
    assert {f"test/site/{name}/accuracy" for name in SIZES} <= set(row)
    # the federated test metrics are those of the union of the sites' test splits
    module = LeukemiaModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    task = get_task("leukemia")
    cfg = load_config(run_dir / "config.yaml")
    splits = [client_site(run_dir, pid).test for pid in range(3)]
    tests = [split.take(range(len(split))) for split in splits]  # in memory, images included
    union = {key: torch.cat([t[key] for t in tests]) for key in tests[0]}
    exact = task.make_metrics(cfg, mergeable=False)
    task.evaluate(module, make_loader(union, 8, shuffle=False), exact)
    values = task.scalar_metrics(exact)
    assert values["accuracy"] == pytest.approx(row["test/accuracy"])
    assert values["stage_macro_f1"] == pytest.approx(row["test/stage_macro_f1"])
    for pid, name in enumerate(SIZES):  # and each site's own value is its split's
        own = task.make_metrics(cfg, mergeable=False)
        task.evaluate(module, make_loader(tests[pid], 8, shuffle=False), own)
        assert task.scalar_metrics(own)["accuracy"] == pytest.approx(row[f"test/site/{name}/accuracy"])


def test_a_public_test_set_the_coordinator_holds_is_scored_exactly_each_round(tmp_path: Path) -> None:
    from fedvlm.cli import main
    from fedvlm.runs import read_metrics
    from fedvlm.tasks.leukemia.module import LeukemiaModule
    from fedvlm.tasks.leukemia.records import prepare_bundle

    public = make_manifest(tmp_path / "public", 12)  # e.g. a published set; no site's data
    run_dir = tmp_path / "run"
    overrides = [
        *SITE_OVERRIDES,
        "federation.num_clients=2",
        "data.synthetic.n=120",
        "federation.rounds=1",
        f"data.server_test={{format: manifest, root: {public['root']}}}",
    ]
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), *overrides]) == 0
    held = json.loads((run_dir / "data" / "server_test" / "counts.json").read_text())
    assert (held["site"], held["train"], held["val"], held["test"]) == ("server_test", 0, 0, 12)
    (row,) = read_metrics(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    task = get_task("leukemia")
    records = task.read_site(
        load_config("leukemia_demo", [*SITE_OVERRIDES, "data.format=manifest", f"data.root={public['root']}"])
    )
    tokenizer = run_tokenizer(cfg, run_dir)
    bundle = prepare_bundle(records.records(np.arange(12)), tokenizer, 32, 32)
    module = LeukemiaModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    exact = task.make_metrics(cfg, mergeable=False)
    task.evaluate(module, make_loader(bundle, 8, shuffle=False), exact)
    for name, value in task.scalar_metrics(exact).items():
        assert row[f"server_test/{name}"] == pytest.approx(value), name


def test_a_server_test_set_with_a_site_key_misspelled_is_refused() -> None:
    with pytest.raises(ConfigError, match="data.server_test: rot is not a site key"):
        load_config("leukemia_demo", ["data.server_test={format: manifest, rot: /x}"])


def test_the_pooled_baseline_joins_every_sites_local_splits_with_distinct_indices(
    three_sites: Path, tmp_path: Path
) -> None:
    overrides = [*SITE_OVERRIDES, f"data.sites={three_sites}", "federation.mode=centralized"]
    cfg = load_config("leukemia_demo", overrides)
    task = get_task("leukemia")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    task.prepare(cfg, run_dir)
    pooled = ensure_site_data(task.read_site, cfg, run_dir, 0, lambda: run_tokenizer(cfg, run_dir))
    sites = []
    for pid in range(3):  # each site alone, as its federated client prepares it
        federated = load_config("leukemia_demo", [*SITE_OVERRIDES, f"data.sites={three_sites}"])
        sites.append(ensure_site_data(task.read_site, federated, tmp_path / f"site{pid}", pid, lambda: None))
    for split in ("train", "val", "test"):
        assert pooled.counts[split] == sum(site.counts[split] for site in sites)
        # indices: site 0's as they are, each later site's shifted past every earlier one's
        expected, shift = [], 0
        for site in sites:
            expected += (site.splits[split]["index"] + shift).tolist()
            shift += (
                max(int(site.splits[s]["index"].max()) for s in ("train", "val", "test") if len(site.splits[s])) + 1
            )
        assert pooled.splits[split]["index"].tolist() == expected
        assert len(set(expected)) == len(expected)
