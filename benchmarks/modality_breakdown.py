"""Where a trained leukemia model is right: test accuracy split by which modality was informative.

The synthetic generator knows, per case, whether the image and the report carry the decisive
evidence. This script re-generates that truth for a run's seed, evaluates a checkpoint on every
site's local test split (one site at a time; only counts are added up) and reports detection
accuracy and stage accuracy on four subsets: both informative, image only, report only, neither.
A model that really fuses the modalities is right wherever either one is informative.

Usage::

    python benchmarks/modality_breakdown.py RUN_DIR [--checkpoint best.ckpt] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.metrics import confusion_matrix

from fedvlm.config import load_config
from fedvlm.data.prepared import make_loader
from fedvlm.tasks.leukemia.module import LeukemiaModule
from fedvlm.tasks.leukemia.synthetic import SynthLeukemiaConfig, generate_leukemia_with_truth
from fedvlm.tasks.site_store import load_site_data, site_data_folders


def breakdown(run_dir: Path, checkpoint: str) -> dict[str, object]:
    cfg = load_config(run_dir / "config.yaml")
    if cfg.data.format != "synthetic" or cfg.data.root is not None:
        raise SystemExit("the breakdown needs a run on generated data (data.format=synthetic)")
    module = LeukemiaModule.load_from_checkpoint(run_dir / "checkpoints" / checkpoint, map_location="cpu").eval()
    synth = OmegaConf.to_container(cfg.data.synthetic)
    truth_config = SynthLeukemiaConfig(**synth, image_size=32, seed=cfg.seed)  # truth does not depend on the size
    names = ("all", "both_informative", "image_only_informative", "report_only_informative", "neither_informative")
    counts = {name: {"n": 0, "correct": 0, "staged": 0, "stage_correct": 0} for name in names}
    num_stages = int(cfg.model.num_stages)
    matrix = np.zeros((num_stages, num_stages), dtype=np.int64)
    for _, folder in site_data_folders(run_dir):
        test = load_site_data(folder).test  # one site at a time
        if not len(test["index"]):
            continue
        index = test["index"].numpy()
        _, informative_image, informative_report = generate_leukemia_with_truth(truth_config, indices=index.tolist())
        probabilities, stages = [], []
        with torch.no_grad():
            for batch in make_loader(test, 128, shuffle=False):
                leukemia_prob, stage_prob = module.predict_probabilities(batch)
                probabilities.append(leukemia_prob)
                stages.append(stage_prob.argmax(-1))
        predicted = torch.cat(probabilities).numpy() > 0.5
        predicted_stage = torch.cat(stages).numpy()
        label, stage = test["leukemia"].numpy(), test["stage"].numpy()
        image_ok, report_ok = informative_image, informative_report
        subsets = {
            "all": np.ones_like(label, dtype=bool),
            "both_informative": image_ok & report_ok,
            "image_only_informative": image_ok & ~report_ok,
            "report_only_informative": ~image_ok & report_ok,
            "neither_informative": ~image_ok & ~report_ok,
        }
        for name, mask in subsets.items():
            staged = mask & (stage >= 0)
            counts[name]["n"] += int(mask.sum())
            counts[name]["correct"] += int((predicted == label)[mask].sum())
            counts[name]["staged"] += int(staged.sum())
            counts[name]["stage_correct"] += int((predicted_stage == stage)[staged].sum())
        staged = stage >= 0
        matrix += confusion_matrix(stage[staged], predicted_stage[staged], labels=list(range(num_stages)))
    rows = {
        name: {
            "n": c["n"],
            "accuracy": c["correct"] / c["n"] if c["n"] else None,
            "stage_accuracy": c["stage_correct"] / c["staged"] if c["staged"] else None,
        }
        for name, c in counts.items()
    }
    return {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "subsets": rows,
        "stage_confusion_matrix": matrix.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="best.ckpt")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = breakdown(args.run_dir, args.checkpoint)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
