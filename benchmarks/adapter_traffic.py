"""Adapter traffic: bytes per client per round, full model vs LoRA adapters.

For each model size, the chest X-ray model is built twice — ``model.adapter.name=none`` and
``lora`` — and a round's traffic is counted exactly as the server counts it: the Flower
``ArrayRecord`` of the keys that travel down (weights trainable at construction) and up
(trainable this round, plus float buffers). Run directories given with ``--runs`` add the bytes
their ``metrics.jsonl`` recorded in real rounds.

Usage::

    python benchmarks/adapter_traffic.py
    python benchmarks/adapter_traffic.py --runs runs/cxr_demo-full runs/cxr_demo-lora
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from omegaconf import OmegaConf

from fedvlm.config import load_config
from fedvlm.federation.callback import set_frozen, travelling_keys
from fedvlm.runs import read_metrics
from fedvlm.tasks.cxr.module import ContrastiveVLM

DEFAULT_OUT = Path(__file__).parent / "results" / "adapter_traffic.json"
BERT_BASE = "{hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072}"

SIZES: dict[str, dict[str, Any]] = {
    "demo (cxr_demo: ResNet-micro + BERT-micro, 64 px)": {
        "overrides": ["model.adapter.image_targets=[]"],
        "vocab_size": 1000,
    },
    "demo ViT (ViT-micro + BERT-micro, 64 px)": {
        # cxr_demo's recipe freezes its CNN tower without adapters (image_targets: []); a ViT has LoRA targets
        "overrides": ["model.image_encoder.name=vit_micro", "model.adapter.image_targets=[qkv]"],
        "vocab_size": 1000,
    },
    "paper size (ViT-B/16 + BERT-base, 224 px)": {
        "overrides": [
            "model.image_encoder.name=vit_base",
            "model.adapter.image_targets=[qkv]",
            "data.image_size=224",
            f"model.text_encoder.options={BERT_BASE}",
            "contrastive.projection_dim=512",
        ],
        "vocab_size": 28996,  # Bio_ClinicalBERT's vocabulary
    },
}

ENCODERS = ("image_encoder", "text_encoder")  # model.freeze_modules


def round_bytes(overrides: list[str], vocab_size: int) -> dict[str, Any]:
    cfg = load_config("cxr_demo", overrides)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    torch.manual_seed(0)
    module = ContrastiveVLM(
        container["model"],
        container["contrastive"],
        container["optim"],
        ("a", "b", "c", "d", "e", "f"),
        cfg.data.image_size,
        vocab_size,
    )
    state = module.state_dict()
    down = travelling_keys(module)
    set_frozen(module, ENCODERS, frozen=False)
    up = travelling_keys(module)
    return {
        "downlink_bytes": ArrayRecord(torch_state_dict={k: state[k] for k in sorted(down)}).count_bytes(),
        "uplink_bytes": ArrayRecord(torch_state_dict={k: state[k] for k in sorted(up)}).count_bytes(),
        "parameters": sum(p.numel() for p in module.parameters()),
        "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="run directories to read measured bytes from")
    parser.add_argument("--sizes", nargs="*", help="subset of size names (default all)")
    args = parser.parse_args()
    result: dict[str, Any] = {"sizes": {}, "runs": {}}
    for name, spec in SIZES.items():
        if args.sizes and not any(s in name for s in args.sizes):
            continue
        full = round_bytes(spec["overrides"], spec["vocab_size"])
        lora = round_bytes([*spec["overrides"], "model.adapter.name=lora"], spec["vocab_size"])
        total_full = full["downlink_bytes"] + full["uplink_bytes"]
        total_lora = lora["downlink_bytes"] + lora["uplink_bytes"]
        result["sizes"][name] = {"full": full, "lora": lora, "reduction": total_full / total_lora}
        print(
            f"{name}: full {total_full / 1e6:.2f} MB/client/round, LoRA {total_lora / 1e6:.3f} MB "
            f"→ {total_full / total_lora:.1f}× fewer bytes"
        )
    for run in args.runs:
        rows = read_metrics(run)
        first = rows[0]
        clients = max(1, len(first["clients"]))
        result["runs"][str(run)] = {
            "adapter": load_config(run / "config.yaml").model.adapter.name,
            "bytes_sent_per_round": first["bytes_sent"],
            "bytes_received_per_round": first["bytes_received"],
            "clients": clients,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
