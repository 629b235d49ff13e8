"""``fedvlm data``: data utilities (``fedvlm data synth`` writes a synthetic dataset as a manifest)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def synth(task: str, n: int, size: int, sites: int, seed: int, out: Path, console: Console) -> Path:
    """Write ``n`` synthetic cases of ``task`` (``leukemia`` or ``cxr``) over ``sites`` sites as a
    manifest with its images under ``out``; returns the manifest's path."""
    if task == "cxr":
        from fedvlm.tasks.cxr.manifest import write_cxr_manifest
        from fedvlm.tasks.cxr.synthetic import SynthCxrConfig, generate_cxr

        dataset = generate_cxr(SynthCxrConfig(n=n, image_size=size, num_sites=sites, seed=seed))
        path = write_cxr_manifest(dataset, out)
        console.print(f"wrote {len(dataset.records)} radiographs with reports to {path}")
        return path
    from fedvlm.tasks.leukemia.manifest import write_manifest
    from fedvlm.tasks.leukemia.synthetic import SynthLeukemiaConfig, generate_leukemia

    records = generate_leukemia(SynthLeukemiaConfig(n=n, image_size=size, num_sites=sites, seed=seed))
    path = write_manifest(records, out)
    positives = sum(r.leukemia for r in records)
    console.print(f"wrote {len(records)} cases ({positives} leukemia) to {path}")
    return path


__all__ = ["synth"]
