"""Training recipes: one accelerate-based loop that trains only a graft's parameters, driven by YAML recipes.

    from graftlm.recipes import load_recipe, train
    result = train(load_recipe("lora-smollm2-135m", ["--train.steps", "50"]))
    result.summary["final_loss"], result.output_dir / "adapter"

Command line: ``graftlm train RECIPE.yaml [--key value ...]`` (see `graftlm.recipes.cli`).
"""

from graftlm.recipes.budget import lora_params_per_rank, lora_rank_for_budget
from graftlm.recipes.config import GraftSpec, Recipe, RecipeError, build_recipe, load_recipe, shipped_recipes

__all__ = [
    "GraftSpec",
    "Recipe",
    "RecipeError",
    "TrainResult",
    "build_recipe",
    "load_recipe",
    "lora_params_per_rank",
    "lora_rank_for_budget",
    "shipped_recipes",
    "train",
]


def __getattr__(name: str):
    if name in ("train", "TrainResult"):  # the loop imports accelerate; load it only when asked for
        from graftlm.recipes import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'graftlm.recipes' has no attribute {name!r}")
