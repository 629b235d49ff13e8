"""The ``fedvlm`` command line.

Examples::

    fedvlm fit --recipe leukemia_demo
    fedvlm fit --recipe leukemia_demo federation.rounds=5 federation.strategy=fedprox
    fedvlm fit --resume runs/leukemia_demo-20260101-120000
    fedvlm evaluate runs/cxr_demo-20260101-120000 --zero-shot --retrieval --few-shot 1,5,16
    fedvlm evaluate runs/cxr_demo-20260101-120000 --leave-one-hospital-out
    fedvlm recipes
    fedvlm data synth --out /tmp/synth --n 5400
    fedvlm certs --out certs --hosts 10.0.0.5,superlink.example.org --supernodes 3
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
    evaluate.add_argument(
        "--few-shot",
        type=_int_list,
        nargs="?",
        const=[],
        metavar="K,K,...",
        help="k-shot linear probes (default shots: evaluation.few_shot)",
    )
    evaluate.add_argument("--leave-one-hospital-out", action="store_true", help="one federation per held-out client")
    evaluate.add_argument("--hospitals", type=_int_list, metavar="H,H,...", help="held-out clients (default all)")
    evaluate.add_argument("--loho-rounds", type=int, help="rounds of each leave-one-out federation")
    evaluate.add_argument("--checkpoint", default="last", choices=("last", "best"))
    evaluate.add_argument("overrides", nargs="*", metavar="evaluation.key=value", help="evaluation overrides")

    explain = commands.add_parser("explain", help="explanations of a trained run (SHAP; Grad-CAM for CXR)")
    explain.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    explain.add_argument("--patients", type=_int_list, metavar="I,I,...", help="test-set sample indices")
    explain.add_argument("--num-patients", type=int, default=8, help="first N test patients (default 8)")
    explain.add_argument("--out", type=Path, help="output folder (default RUN_DIR/explanations)")
    explain.add_argument("--checkpoint", default="last", choices=("last", "best"))
    explain.add_argument("--client", type=int, default=0, help="partition id of the site to explain (default 0)")
    explain.add_argument("overrides", nargs="*", metavar="explain.key=value", help="explain overrides")

    deploy = commands.add_parser(
        "deploy", help="prepare a run and per-hospital site folders for Flower's deployment engine"
    )
    deploy_commands = deploy.add_subparsers(dest="deploy_command", required=True)
    prepare = deploy_commands.add_parser("prepare", help="prepare a run directory on the coordinator (no training)")
    prepare.add_argument("--recipe", required=True)
    prepare.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    prepare.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    export = deploy_commands.add_parser("export-site", help="copy one hospital's shard and what its SuperNode needs")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--partition", type=int, required=True, help="the hospital's partition id")
    export.add_argument("--out", type=Path, required=True, metavar="SITE_DIR")

    commands.add_parser("recipes", help="list the built-in recipes")

    certs = commands.add_parser(
        "certs", help="TLS certificates for a SuperLink and SuperNode authentication keys (docs/deployment.md)"
    )
    certs.add_argument("--out", type=Path, required=True, help="folder to write (existing files are never replaced)")
    certs_mode = certs.add_mutually_exclusive_group()
    certs_mode.add_argument(
        "--hosts",
        type=_name_list,
        default=None,
        metavar="H,H,...",
        help="IP addresses / DNS names of the SuperLink for the server certificate (default 127.0.0.1,localhost)",
    )
    certs_mode.add_argument(
        "--supernode-key", metavar="NAME", help="only make one SuperNode key pair NAME.key/NAME.pub (at a hospital)"
    )
    certs.add_argument("--supernodes", type=int, default=0, metavar="N", help="also make N SuperNode key pairs")
    certs.add_argument("--days", type=int, default=365, help="validity of the CA and server certificate")

    data = commands.add_parser("data", help="data utilities")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write a synthetic dataset (leukemia or cxr) as a manifest")
    synth.add_argument("--task", choices=("leukemia", "cxr"), default="leukemia")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--n", type=int, default=5400)
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.add_argument("--sites", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (errors in user input print one line, exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (`evaluate RUN --zero-shot evaluation.x=1`).
    unknown = [arg for arg in extra if arg.startswith("-") or "=" not in arg or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    console = Console()
    try:
        if args.command == "fit":
            from fedvlm.commands.fit import fit

            if args.recipe is None and args.resume is None:
                console.print("[red]error:[/] give --recipe NAME or --resume RUN_DIR")
                return 2
            fit(args.recipe, list(args.overrides), out=args.out, resume=args.resume, console=console)
        elif args.command == "evaluate":
            from fedvlm.commands.evaluate import evaluate_run

            chosen = args.zero_shot or args.retrieval or args.few_shot is not None or args.leave_one_hospital_out
            evaluate_run(
                args.run_dir,
                list(args.overrides),
                zero_shot=args.zero_shot or not chosen,
                retrieval=args.retrieval,
                few_shot_k=args.few_shot,
                loho=args.leave_one_hospital_out,
                hospitals=args.hospitals,
                loho_rounds=args.loho_rounds,
                checkpoint=args.checkpoint,
                console=console,
            )
        elif args.command == "explain":
            from fedvlm.commands.explain import explain_run

            explain_run(
                args.run_dir,
                args.patients,
                args.num_patients,
                args.out,
                list(args.overrides),
                checkpoint=args.checkpoint,
                console=console,
                client=args.client,
            )
        elif args.command == "deploy":
            from fedvlm.commands.deploy import export_site, prepare_run

            if args.deploy_command == "prepare":
                prepare_run(args.recipe, list(args.overrides), args.out)
                console.print(
                    f"prepared {args.out}: config, tokenizer and meta only; each SuperNode prepares its own data "
                    "(name it in --node-config: site-name, data-format, data-root, data-reports)"
                )
            else:
                site = export_site(args.run_dir, args.partition, args.out)
                console.print(f"site {args.partition}: {site} (give it to the SuperNode as run-dir)")
        elif args.command == "recipes":
            from fedvlm.config import list_recipes

            for name, description in list_recipes().items():
                console.print(f"[bold]{name:<20}[/] {description}", soft_wrap=True)
        elif args.command == "certs":
            from fedvlm.commands.deploy import certificates

            certificates(args.out, args.hosts, args.supernodes, args.days, args.supernode_key, console)
        elif args.command == "data" and args.data_command == "synth":
            from fedvlm.commands.data import synth

            synth(args.task, args.n, args.size, args.sites, args.seed, args.out, console)
    except FedVLMError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)  # one line, however long
        return 2
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
