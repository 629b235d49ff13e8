"""The ``fedvlm`` command line.

Examples::

    fedvlm fit --recipe leukemia_demo
    fedvlm fit --recipe leukemia_demo federation.rounds=5 federation.strategy=fedprox
    fedvlm fit --resume runs/leukemia_demo-20260101-120000
    fedvlm evaluate runs/cxr_demo-20260101-120000 --zero-shot --retrieval --few-shot 1,5,16
    fedvlm evaluate runs/cxr_demo-20260101-120000 --leave-one-hospital-out
    fedvlm recipes
    fedvlm data synth --out /tmp/synth --n 5400
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from fedvlm.errors import FedVLMError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedvlm", description="Federated multimodal medical AI")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="train a federation (or centralized baseline) from a recipe")
    fit.add_argument("--recipe", help="recipe name (see `fedvlm recipes`) or a YAML path")
    fit.add_argument("--out", type=Path, help="run directory (default runs/<recipe>-<timestamp>)")
    fit.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last completed round")
    fit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    evaluate = commands.add_parser(
        "evaluate", help="zero-shot / retrieval / few-shot / leave-one-hospital-out evaluation of a CXR run"
    )
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--zero-shot", action="store_true", help="multi-label AUROC from prompts")
    evaluate.add_argument("--retrieval", action="store_true", help="image↔text Recall@K")
    evaluate.add_argument("--few-shot", type=_int_list, metavar="K,K,...", help="k-shot linear probes")
    evaluate.add_argument("--leave-one-hospital-out", action="store_true", help="one federation per held-out client")
    evaluate.add_argument("--hospitals", type=_int_list, metavar="H,H,...", help="held-out clients (default all)")
    evaluate.add_argument("--loho-rounds", type=int, help="rounds of each leave-one-out federation")
    evaluate.add_argument("--checkpoint", default="last", choices=("last", "best"))
    evaluate.add_argument("overrides", nargs="*", metavar="evaluation.key=value", help="evaluation overrides")

    commands.add_parser("recipes", help="list the built-in recipes")

    data = commands.add_parser("data", help="data utilities")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write the synthetic leukemia dataset as a manifest")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--n", type=int, default=5400)
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.add_argument("--sites", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (errors in user input print one line, exit 2)."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "fit":
            from fedvlm.fit import fit

            if args.recipe is None and args.resume is None:
                console.print("[red]error:[/] give --recipe NAME or --resume RUN_DIR")
                return 2
            fit(args.recipe, list(args.overrides), out=args.out, resume=args.resume, console=console)
        elif args.command == "evaluate":
            from fedvlm.evaluate import evaluate_run

            chosen = args.zero_shot or args.retrieval or args.few_shot or args.leave_one_hospital_out
            evaluate_run(
                args.run_dir, list(args.overrides),
                zero_shot=args.zero_shot or not chosen, retrieval=args.retrieval,
                few_shot_k=args.few_shot or (), loho=args.leave_one_hospital_out, hospitals=args.hospitals,
                loho_rounds=args.loho_rounds, checkpoint=args.checkpoint, console=console,
            )
        elif args.command == "recipes":
            from fedvlm.config import list_recipes

            for name, description in list_recipes().items():
                console.print(f"[bold]{name:<20}[/] {description}", soft_wrap=True)
        elif args.command == "data" and args.data_command == "synth":
            _synth(args, console)
    except FedVLMError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)  # one line, however long
        return 2
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _synth(args: argparse.Namespace, console: Console) -> None:
    from fedvlm.data.manifest import write_manifest
    from fedvlm.data.synthetic_leukemia import SynthLeukemiaConfig, generate_leukemia

    records = generate_leukemia(
        SynthLeukemiaConfig(n=args.n, image_size=args.size, num_sites=args.sites, seed=args.seed)
    )
    path = write_manifest(records, args.out)
    positives = sum(r.leukemia for r in records)
    console.print(f"wrote {len(records)} cases ({positives} leukemia) to {path}")


if __name__ == "__main__":
    sys.exit(main())
