"""DP-SGD cost: step time and peak memory of a private vs a non-private training step.

The leukemia demo model (micro ViT + micro BERT) trains on the same batch of synthetic tensors
twice: a plain optimizer step, and a DP-SGD step (per-sample gradients by Opacus' hooks,
per-sample clipping, noise; ``fedvlm.privacy.dp.batch_shaped_ids`` for BERT). Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the peak resident set size
(``resource.getrusage``) of a fresh process per variant, so the CPU figure includes the
interpreter and libraries (~0.9 GB) and the ratio understates the training memory's growth.
Writes ``benchmarks/results/dp_cost.json``.

Usage::

    python benchmarks/dp_cost.py --batch-size 16 --steps 5
    python benchmarks/dp_cost.py --device cuda --batch-size 64 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedvlm.config import load_config
from fedvlm.privacy.dp import batch_shaped_ids
from fedvlm.tasks.leukemia.module import LeukemiaModule

RESULTS = Path(__file__).resolve().parent / "results" / "dp_cost.json"


def build(image_size: int, text_length: int, device: torch.device) -> LeukemiaModule:
    cfg = load_config("leukemia_demo", [f"data.image_size={image_size}", f"data.max_text_length={text_length}"])
    L.seed_everything(0, verbose=False)
    module = LeukemiaModule(
        OmegaConf.to_container(cfg.model, resolve=True),  # type: ignore[arg-type]
        OmegaConf.to_container(cfg.optim, resolve=True),  # type: ignore[arg-type]
        image_size,
        vocab_size=500,
    )
    return module.to(device).train()


def make_batch(batch_size: int, image_size: int, text_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": torch.randint(1, 500, (batch_size, text_length), generator=generator),
        "attention_mask": torch.ones(batch_size, text_length, dtype=torch.long),
        "leukemia": torch.randint(0, 2, (batch_size,), generator=generator),
        "stage": torch.randint(-1, 4, (batch_size,), generator=generator),
    }
    return {k: v.to(device) for k, v in batch.items()}


def measure(step: Callable[[], None], steps: int, device: torch.device) -> dict[str, float]:
    """Median step time and peak memory of ``steps`` calls after one warm-up call."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    times.sort()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "step_seconds": times[len(times) // 2],
        "peak_rss_mb": peak_rss_mb,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb,
    }


def plain_step(module: LeukemiaModule, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    optimizer = module.configure_optimizers()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        optimizer.step()

    return step


def private_step(module: LeukemiaModule, batch: dict[str, torch.Tensor], mode: str) -> Callable[[], None]:
    batch_shaped_ids(module)
    optimizer = module.configure_optimizers()
    size = batch["image"].shape[0]
    loader = DataLoader(TensorDataset(torch.zeros(size)), batch_size=size)  # fixes the expected batch size
    _, dp_optimizer, _ = PrivacyEngine().make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode=mode,
        wrap_model=False,
    )

    def step() -> None:
        dp_optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        dp_optimizer.step()

    return step


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """One variant (``plain`` or ``dp``), measured in this process."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = make_batch(args.batch_size, args.image_size, args.text_length, device)
    module = build(args.image_size, args.text_length, device)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no Trainer attached
    step = plain_step(module, batch) if args.variant == "plain" else private_step(module, batch, args.grad_sample_mode)
    return measure(step, args.steps, device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--text-length", type=int, default=48)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--grad-sample-mode", default="hooks", choices=("hooks", "functorch"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--variant", choices=("plain", "dp"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return {}
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    measured = {}
    for variant in ("plain", "dp"):  # a fresh process each: peak RSS is per variant
        child = subprocess.run(
            [sys.executable, __file__, *passed, "--variant", variant], capture_output=True, text=True, check=True
        )
        measured[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    plain, private = measured["plain"], measured["dp"]
    device = torch.device(args.device)
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "variant"},
        "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "non_private": plain,
        "dp_sgd": private,
        "time_ratio": private["step_seconds"] / plain["step_seconds"],
        "memory_ratio": private["peak_memory_mb"] / plain["peak_memory_mb"],
        "memory_note": "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of a fresh process (CPU)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
