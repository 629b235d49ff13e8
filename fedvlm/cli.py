"""The ``fedvlm`` command line.

Examples::

    fedvlm fit --recipe leukemia_demo
    fedvlm fit --recipe leukemia_demo federation.rounds=5 federation.strategy=fedprox
    fedvlm fit --resume runs/leukemia_demo-20260101-120000
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
