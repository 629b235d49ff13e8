"""Update compression: uplink bytes per client-round and final metrics, per codec, on a demo recipe.

Variants (``federation.codec``): ``fp32`` (``none``, the reference), ``fp16``, ``int8``, ``int4``,
``topk`` (1% of each tensor's delta entries, 8-bit values) without and with error feedback,
``topk_ef_dense`` (small tensors whole, 0.8% of the others, error feedback), and
``adapters_int8`` (``cxr_demo`` only: LoRA adapters travel, quantised to 8 bits).

For each variant: the exact ``fedvlm fit`` command, the uplink bytes per client-round (the train
exchange's replies, ``uplink_bytes`` in ``metrics.jsonl``, over every round and client), the ratio
to ``fp32``, and the last round's test metrics; written to a JSON file.

Usage::

    python benchmarks/compression.py                                   # leukemia_demo, every variant
    python benchmarks/compression.py --recipe cxr_demo --variants fp32 topk_ef adapters_int8
    python benchmarks/compression.py --rounds 2 --n 400 --out /tmp/compression.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from runner import fit_variant  # benchmarks/runner.py (scripts run from benchmarks/)

from fedvlm.runs import read_metrics

CODECS = {
    "fp32": "federation.codec=none",
    "fp16": "federation.codec=fp16",
    "int8": "federation.codec=int8",
    "int4": "federation.codec=int4",
    "topk": "federation.codec={name: topk, fraction: 0.01, bits: 8, error_feedback: false}",
    "topk_ef": "federation.codec={name: topk, fraction: 0.01, bits: 8, error_feedback: true}",
    # tensors under 513 entries (biases, norms, heads: 1.8% of the leukemia demo's entries) whole,
    # 0.8% of the others: the bytes of top-1% stay >= 100x below float32
    "topk_ef_dense": (
        "federation.codec={name: topk, fraction: 0.008, bits: 8, error_feedback: true, dense_below: 513}"
    ),
    "adapters_int8": "federation.codec=int8",
}
METRICS = {
    "leukemia_demo": ("test/accuracy", "test/auroc", "test/stage_macro_f1"),
    "cxr_demo": ("test/macro_auroc", "test/i2t_recall@5", "test/t2i_recall@5"),
}


def variant_overrides(variant: str, recipe: str) -> list[str]:
    """The config overrides that make ``variant`` out of ``recipe``."""
    overrides = [CODECS[variant]]
    if variant == "adapters_int8":
        if recipe != "cxr_demo":
            raise SystemExit("adapters_int8 needs cxr_demo (the leukemia demo has no adapter recipe)")
        overrides.append("model.adapter.name=lora")
    return overrides


def uplink_per_client_round(run_dir: Path) -> float:
    """Mean bytes of one client's training reply over the run."""
    rows = read_metrics(run_dir)
    return sum(r["uplink_bytes"] for r in rows) / sum(r["num_clients"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="leukemia_demo", choices=sorted(METRICS))
    parser.add_argument("--variants", nargs="+", default=None, choices=sorted(CODECS))
    parser.add_argument("--rounds", type=int, default=None, help="federation.rounds (default: the recipe's)")
    parser.add_argument("--n", type=int, default=None, help="data.synthetic.n (default: the recipe's)")
    parser.add_argument("--runs", type=Path, default=Path("runs/compression"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compression.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every variant")
    args = parser.parse_args()
    variants = args.variants or [v for v in CODECS if v != "adapters_int8" or args.recipe == "cxr_demo"]
    if "fp32" not in variants:
        variants = ["fp32", *variants]  # the reference of every ratio
    common = list(args.overrides)
    common += [f"federation.rounds={args.rounds}"] if args.rounds else []
    common += [f"data.synthetic.n={args.n}"] if args.n else []
    results: dict[str, dict] = {}
    for variant in variants:
        out = args.runs / f"{args.recipe}-{variant}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = fit_variant(
            args.recipe, out, [*common, *variant_overrides(variant, args.recipe)], METRICS[args.recipe]
        )
        if result["exit_code"] == 0:
            result["uplink_bytes_per_client_round"] = round(uplink_per_client_round(out))
        results[variant] = result
        print(json.dumps({variant: result}, indent=1))
    reference = results["fp32"].get("uplink_bytes_per_client_round")
    for result in results.values():
        if reference and result.get("uplink_bytes_per_client_round"):
            result["uplink_reduction_vs_fp32"] = round(reference / result["uplink_bytes_per_client_round"], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": args.recipe, "variants": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
