"""A multi-site federation: three hospitals, each with its own folder in its own public layout.

The leukemia generator draws three hospitals (stain, magnification and report template differ);
each is written to disk in another layout that fedvlm reads (ALL-IDB2: single-cell TIFFs and a
reports CSV; ALL-IDB1: JPEG smears with ``.xyc`` blast centres and a reports CSV; a fedvlm
manifest of PNGs), and ``fedvlm fit --recipe leukemia_demo data.sites=sites.yaml`` federates them:
each client reads, validates, splits and prepares only its own folder. It writes the sites'
reported counts, the last round's pooled and per-site test metrics, and the wall time as JSON.

Usage::

    python benchmarks/multi_site.py --out benchmarks/results/multi_site.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

from PIL import Image

from fedvlm.tasks.leukemia.manifest import write_manifest
from fedvlm.tasks.leukemia.records import STAGE_NAMES, LeukemiaRecord
from fedvlm.tasks.leukemia.synthetic import SynthLeukemiaConfig, generate_leukemia

DEFAULT_OUT = Path(__file__).parent / "results" / "multi_site.json"
LAYOUTS = ("all_idb2", "all_idb1", "manifest")


def _reports_csv(path: Path, rows: list[tuple[str, LeukemiaRecord]]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "report", "stage"])
        for name, record in rows:
            stage = "" if record.stage is None else STAGE_NAMES[record.stage]
            writer.writerow([name, record.report, stage])


def write_site(records: list[LeukemiaRecord], root: Path, layout: str) -> dict[str, str]:
    """``records`` in ``layout`` under ``root``; returns the site's entry keys (format, root, reports)."""
    root.mkdir(parents=True, exist_ok=True)
    if layout == "manifest":
        return {"format": "manifest", "root": str(write_manifest(records, root))}
    folder = root / ("ALL_IDB2" if layout == "all_idb2" else "ALL_IDB1")
    images = folder / ("img" if layout == "all_idb2" else "im")
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, record in enumerate(records, start=1):
        assert not isinstance(record.image, Path)
        name = f"Im{number:03d}_{record.leukemia}.{'tif' if layout == 'all_idb2' else 'jpg'}"
        Image.fromarray(record.image).save(images / name, **({"quality": 95} if layout == "all_idb1" else {}))
        if layout == "all_idb1":
            xyc = folder / "xyc" / name.replace(".jpg", ".xyc")
            xyc.parent.mkdir(exist_ok=True)
            xyc.write_text("".join(f"{x:.0f} {y:.0f}\n" for x, y in record.blast_points) if record.leukemia else "")
        rows.append((name, record))
    _reports_csv(root / "reports.csv", rows)
    return {"format": layout, "root": str(folder), "reports": str(root / "reports.csv")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedvlm-multi-site"))
    parser.add_argument("--cases", type=int, default=1800, help="cases over the three hospitals")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of the fit")
    args = parser.parse_args(argv)
    from fedvlm.cli import main as fedvlm_main

    records = generate_leukemia(SynthLeukemiaConfig(n=args.cases, num_sites=3, seed=0))
    by_site: dict[str, list[LeukemiaRecord]] = {}
    for record in records:
        by_site.setdefault(str(record.site), []).append(record)
    entries = []
    for (site, site_records), layout in zip(sorted(by_site.items()), LAYOUTS, strict=True):
        entry = {"name": f"hospital_{layout}", **write_site(site_records, args.work / "sites" / site, layout)}
        entries.append(entry)
    sites_file = args.work / "sites.yaml"
    sites_file.write_text("".join(f"- {json.dumps(entry)}\n" for entry in entries))
    run_dir = args.work / "run"
    started = time.perf_counter()
    code = fedvlm_main(
        ["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), f"data.sites={sites_file}", *args.overrides]
    )
    wall = time.perf_counter() - started
    if code:
        raise SystemExit(f"fedvlm fit failed ({code})")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    partition = json.loads((run_dir / "partition.json").read_text())
    report: dict[str, Any] = {
        "sites": [
            {key: client[key] for key in ("site", "train", "val", "test")} | {"layout": entry["format"]}
            for client, entry in zip(partition["clients"], entries, strict=True)
        ],
        "rounds": len(rows),
        "last_round": {key: value for key, value in last.items() if key.startswith(("test/", "val/"))},
        "wall_s": round(wall, 1),
        "overrides": args.overrides,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
