"""Where a trained leukemia model is right: test accuracy split by which modality was informative.

The synthetic generator knows, per case, whether the image and the report carry the decisive
evidence. This script re-generates that truth for a run's seed, evaluates a checkpoint on the
run's held-out test split and reports detection accuracy and stage accuracy on four subsets:
both informative, image only, report only, neither. A model that really fuses the modalities is
right wherever either one is informative.

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
from fedvlm.data.synthetic_leukemia import SynthLeukemiaConfig, generate_leukemia_with_truth
from fedvlm.models.leukemia import LeukemiaModule
from fedvlm.tasks import get_task


def breakdown(run_dir: Path, checkpoint: str) -> dict[str, object]:
    cfg = load_config(run_dir / "config.yaml")
    if cfg.data.format != "synthetic" or cfg.data.root is not None:
        raise SystemExit("the breakdown needs a run on generated data (data.format=synthetic)")
    module = LeukemiaModule.load_from_checkpoint(run_dir / "checkpoints" / checkpoint, map_location="cpu").eval()
    test = get_task(cfg.task).load_test(run_dir)
    synth = OmegaConf.to_container(cfg.data.synthetic)
    _, informative_image, informative_report = generate_leukemia_with_truth(
        SynthLeukemiaConfig(**synth, image_size=32, seed=cfg.seed)  # truth does not depend on the image size
    )
    probabilities, stages = [], []
    with torch.no_grad():
        for batch in make_loader(test, 128, shuffle=False):
            leukemia_prob, stage_prob = module.predict_probabilities(batch)
            probabilities.append(leukemia_prob)
            stages.append(stage_prob.argmax(-1))
    predicted = torch.cat(probabilities).numpy() > 0.5
    predicted_stage = torch.cat(stages).numpy()
    label, stage, index = test["leukemia"].numpy(), test["stage"].numpy(), test["index"].numpy()
    image_ok, report_ok = informative_image[index], informative_report[index]
    subsets = {
        "all": np.ones_like(label, dtype=bool),
        "both_informative": image_ok & report_ok,
        "image_only_informative": image_ok & ~report_ok,
        "report_only_informative": ~image_ok & report_ok,
        "neither_informative": ~image_ok & ~report_ok,
    }
    rows = {}
    for name, mask in subsets.items():
        staged = mask & (stage >= 0)
        rows[name] = {
            "n": int(mask.sum()),
            "accuracy": float((predicted == label)[mask].mean()),
            "stage_accuracy": float((predicted_stage == stage)[staged].mean()) if staged.any() else None,
        }
    staged = stage >= 0
    return {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "subsets": rows,
        "stage_confusion_matrix": confusion_matrix(stage[staged], predicted_stage[staged]).tolist(),
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
