"""The ``graftlm`` command. Subcommands: ``models``, ``convert``, ``grafts``, ``demo``, ``train``, ``compare``,
``eval``."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cmd_models(args: argparse.Namespace) -> int:
    from graftlm.models import EMBEDDED_CHECKPOINTS, _is_converted, embedded_checkpoint_dir

    for name, checkpoint in EMBEDDED_CHECKPOINTS.items():
        target = embedded_checkpoint_dir(name)
        state = "converted" if _is_converted(target, name) else "not converted yet"
        print(f"{name:14s} {checkpoint.description}\n{'':14s} package {checkpoint.package} ({checkpoint.install_hint}); "
              f"cache {target} [{state}]")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from graftlm.models import convert_embedded_checkpoint

    for name in args.names:
        started = time.perf_counter()
        path = convert_embedded_checkpoint(name, force=args.force)
        print(f"{name}: {path} ({time.perf_counter() - started:.1f} s)")
    return 0


def _cmd_grafts(args: argparse.Namespace) -> int:
    import graftlm  # noqa: F401  (registers the built-in grafts)
    from graftlm.adapters import get_graft_type, registered_graft_types

    for name in registered_graft_types():
        config_class = get_graft_type(name).config_class
        print(f"{name}: {config_class.__name__} - {(config_class.__doc__ or '').strip().splitlines()[0]}")
        for field_name, help_text in config_class.field_help().items():
            print(f"    {field_name}: {help_text}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from graftlm.demo import run_demo

    summary = run_demo(model_name=args.model, out_dir=args.out, quick=args.quick, steps=args.steps,
                       n_eval=args.n_eval, baseline=not args.no_baseline)
    return 0 if summary.get("ok") else 1


def build_parser() -> argparse.ArgumentParser:
    from graftlm import __version__

    parser = argparse.ArgumentParser(prog="graftlm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"graftlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the embedded real checkpoints").set_defaults(func=_cmd_models)

    convert = sub.add_parser("convert", help="convert embedded GGUF checkpoints once into the cache")
    convert.add_argument("names", nargs="+", choices=["smollm2-135m", "gemma-3-270m"])
    convert.add_argument("--force", action="store_true", help="convert again even if cached")
    convert.set_defaults(func=_cmd_convert)

    sub.add_parser("grafts", help="list registered graft types and their config fields").set_defaults(
        func=_cmd_grafts
    )

    demo = sub.add_parser("demo", help="the main job: attach a graft to a real checkpoint, train, score, save, reload")
    demo.add_argument("--model", default="smollm2-135m", help="embedded checkpoint name or a local path")
    demo.add_argument("--out", default="out/demo", help="directory for the adapter and the report")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 60; 6 with --quick)")
    demo.add_argument("--n-eval", type=int, default=None, help="held-out examples scored (default 200; 16 with --quick)")
    demo.add_argument("--no-baseline", action="store_true", help="skip the LoRA same-budget baseline")
    demo.set_defaults(func=_cmd_demo)

    try:
        from graftlm.recipes.cli import add_train_arguments, run_train
    except ImportError:
        pass
    else:
        train = sub.add_parser("train", help="train a graft from a recipe YAML (`--key value` overrides)")
        add_train_arguments(train)
        train.set_defaults(func=run_train)

    from graftlm.compare.cli import add_compare_arguments, run_compare_cli

    compare = sub.add_parser("compare", help="train several systems on the same data and compare them with "
                                             "intervals and paired tests (a spec YAML, `--key value` overrides)")
    add_compare_arguments(compare)
    compare.set_defaults(func=run_compare_cli)

    try:
        from graftlm.eval.runner import add_eval_arguments, run_eval_cli
    except ImportError:
        pass
    else:
        from graftlm.adapters import attach_adapter
        from graftlm.models import load_model

        evaluate = sub.add_parser("eval", help="score a model (optionally with an adapter) on a task")
        add_eval_arguments(evaluate)
        evaluate.set_defaults(func=lambda args: run_eval_cli(args, load_model, attach_adapter))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in ("train", "compare"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        args.overrides = unknown
    result = args.func(args)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2))
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
