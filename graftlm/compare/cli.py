"""``graftlm compare SPEC.yaml [--quick] [--out DIR] [--systems NAME ...] [--resume] [--key value ...]``."""

from __future__ import annotations

import argparse
import shlex
import sys

from graftlm.recipes.config import RecipeError


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("spec", help="compare spec YAML (see benchmarks/compare/)")
    parser.add_argument("--quick", action="store_true",
                        help="a CI-sized run: 2 steps, 16 training and 8 held-out examples, one seed")
    parser.add_argument("--out", default=None, help="output directory (default: the spec's output_dir)")
    parser.add_argument("--systems", nargs="+", default=None, metavar="NAME",
                        help="run only these systems (and the reference)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished (system, seed) results whose spec is unchanged")
    parser.add_argument("--dry-run", action="store_true", help="validate the spec and print it; run nothing")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.epilog = "Overrides: --section.key value after the spec path (e.g. --train.steps 100 --seeds [0,1,2])."
    return parser


def plain(value):
    """A raw spec with command-line override strings read as YAML values, for printing."""
    import yaml

    from graftlm.recipes.config import CliString

    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return yaml.safe_load(value) if isinstance(value, CliString) else value


def run_compare_cli(args: argparse.Namespace) -> int:
    """Validate and run the spec; a bad spec prints its problems and returns 2."""
    import yaml

    from graftlm.compare.runner import run_compare
    from graftlm.compare.spec import build_compare_spec, load_compare_spec, quick_overrides

    overrides = list(getattr(args, "overrides", None) or [])
    try:
        spec = load_compare_spec(args.spec, overrides)
        if args.quick:
            spec = build_compare_spec(quick_overrides(spec.raw))
        if args.dry_run:
            print(yaml.safe_dump(plain(spec.raw), sort_keys=False), end="")
            return 0
        command = "graftlm compare " + " ".join(shlex.quote(a) for a in [args.spec, *overrides]
                                                + (["--quick"] if args.quick else []))
        report = run_compare(spec, out_dir=args.out, resume=args.resume, only=args.systems,
                             progress=args.progress, command=command)
    except RecipeError as err:
        print(f"graftlm compare: {err}", file=sys.stderr)
        return 2
    from graftlm.compare.report import markdown

    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_compare_arguments(argparse.ArgumentParser(prog="graftlm compare", description=__doc__))
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    return run_compare_cli(args)


if __name__ == "__main__":
    sys.exit(main())
