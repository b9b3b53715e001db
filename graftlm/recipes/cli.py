"""``graftlm train RECIPE.yaml [--key value ...]``: the parser hook and the runner the ``graftlm`` CLI calls.

Overrides come after the recipe path, with dotted keys into the recipe (``--train.steps 50``,
``--graft.r 16``, ``--data.task_kwargs.n_pairs 8``, ``--train.gradient_checkpointing`` alone means true).
Under ``accelerate launch`` the same command trains on several processes::

    accelerate launch --num_processes 2 -m graftlm.recipes.cli RECIPE.yaml --train.steps 50

(on a machine without GPUs add ``--multi_gpu``: accelerate's plain ``--cpu`` launcher starts one process;
the loop then joins the processes with gloo on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys

from graftlm.recipes.config import RecipeError, check_recipe_inputs, load_recipe


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``graftlm train``'s arguments; unknown ``--key value`` pairs are the recipe overrides."""
    parser.add_argument("recipe", help="recipe YAML file (see graftlm/recipes/configs/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe (with overrides), its data files and task, and print it "
                             "resolved; train nothing (the model is not loaded)")
    parser.epilog = "Overrides: --section.key value (e.g. --train.steps 50 --graft.r 16), after the recipe path."
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Load, validate and run the recipe; a bad recipe (values, data files, task) prints its problems and
    returns 2 before the model is loaded."""
    overrides = list(getattr(args, "overrides", None) or [])
    try:
        recipe = load_recipe(args.recipe, overrides)
        try:
            check_recipe_inputs(recipe)
        except RecipeError as err:
            raise RecipeError(f"recipe {args.recipe}: {err}") from None
        if args.dry_run:
            print(recipe.to_yaml(), end="")
            return 0
        from graftlm.recipes.loop import train

        result = train(recipe)
    except RecipeError as err:
        print(f"graftlm train: {err}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(result.summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_train_arguments(argparse.ArgumentParser(prog="graftlm train", description=__doc__,
                                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    return run_train(args)


if __name__ == "__main__":
    sys.exit(main())
