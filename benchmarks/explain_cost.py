"""Explanation cost: model evaluations and seconds per explained patient (both modalities, both heads).

Two model sizes, randomly initialised (cost does not depend on the weights): the leukemia demo
(ViT-micro + BERT-micro, 64 px, 64 patches) and the Fed-MMX paper's size (ViT-B/16 + a
BERT-base-sized text encoder, 224 px, 196 patches, 128 tokens). Each is explained with
:func:`fedvlm.explain.explain_patients`, the code path of the per-round callback and of
``fedvlm explain``, at several ``max_evals`` budgets.

Usage::

    python benchmarks/explain_cost.py                         # both sizes
    python benchmarks/explain_cost.py --sizes demo --patients 4
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fedvlm.config import load_config
from fedvlm.explain.shapley import ExplainSettings, TokenVocabulary
from fedvlm.models.tokenizer import build_word_tokenizer
from fedvlm.tasks.leukemia.explain import explain_patients
from fedvlm.tasks.leukemia.module import LeukemiaModule
from fedvlm.tasks.leukemia.records import prepare_bundle
from fedvlm.tasks.leukemia.synthetic import SynthLeukemiaConfig, generate_leukemia

DEFAULT_OUT = Path(__file__).parent / "results" / "explain_cost.json"
BERT_BASE = "{hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072}"
SIZES: dict[str, dict[str, Any]] = {
    "demo": {"overrides": [], "image_size": 64, "max_text_length": 80},
    "paper": {
        "overrides": [
            "model.image_encoder.name=vit_base",
            f"model.text_encoder.options={BERT_BASE}",
            "model.fusion_dim=512",
        ],
        "image_size": 224,
        "max_text_length": 128,
    },
}


def measure(size: str, patients: int, budgets: list[int]) -> list[dict[str, Any]]:
    spec = SIZES[size]
    records = generate_leukemia(SynthLeukemiaConfig(n=max(patients, 8), image_size=spec["image_size"], seed=0))
    tokenizer = build_word_tokenizer(r.report for r in records)
    bundle = prepare_bundle(records[:patients], tokenizer, spec["image_size"], spec["max_text_length"])
    cfg = load_config("leukemia_demo", [f"data.image_size={spec['image_size']}", *spec["overrides"]])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    torch.manual_seed(0)
    module = LeukemiaModule(container["model"], container["optim"], spec["image_size"], len(tokenizer))
    vocabulary = TokenVocabulary.from_tokenizer(tokenizer)
    # shap compiles its permutation code on the first call of a process: paid once, not per patient
    started = time.perf_counter()
    explain_patients(module, {k: v[:1] for k, v in bundle.items()}, ExplainSettings(max_evals=20), vocabulary)
    warm_up = time.perf_counter() - started
    rows = []
    for budget in budgets:
        started = time.perf_counter()
        explanations = explain_patients(module, bundle, ExplainSettings(max_evals=budget), vocabulary)
        seconds = time.perf_counter() - started
        parts = [m for e in explanations for m in (e.image, e.text) if m is not None]
        rows.append(
            {
                "size": size,
                "max_evals": budget,
                "patients": patients,
                "model_evals_per_patient": sum(m.model_evals for m in parts) / patients,
                "seconds_per_patient": seconds / patients,
                "efficiency_error_max": max(max(m.efficiency_error.values()) for m in parts),
                "first_call_seconds": warm_up,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--budgets", type=int, nargs="*", default=[300, 1000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for size in args.sizes for row in measure(size, args.patients, args.budgets)]
    result = {"machine": platform.processor() or platform.machine(), "torch_threads": args.threads, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
