"""``graftlm train --dry-run`` checks everything it can without loading the model; every recipe error is a
`RecipeError` (exit 2, the problem named), never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graftlm.recipes.cli import main as train_main
from graftlm.recipes.config import RecipeError, build_recipe, check_recipe_inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def recipe_file(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")

    def write(**sections):
        recipe = {"model": {"name": "smollm2-135m"}, "graft": {"type": "lora"}, "data": {"dataset": str(data)},
                  **sections}
        path = tmp_path / "recipe.yaml"
        path.write_text(json.dumps(recipe))
        return str(path)

    return write


def dry_run(capsys, path, *overrides):
    code = train_main([path, "--dry-run", *overrides])
    captured = capsys.readouterr()
    return code, captured.err


def test_a_good_recipe_passes(recipe_file, capsys):
    code, err = dry_run(capsys, recipe_file())
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    "sections, overrides, message",
    [
        ({"data": {"dataset": "/nowhere/train.jsonl"}}, [], "data.dataset: file /nowhere/train.jsonl does not exist"),
        ({"data": {"task": "chain_sum", "eval_dataset": "/nowhere/eval.jsonl"}}, [],
         "data.eval_dataset: set, but the data is a task"),
        ({"data": {"dataset": "json", "data_files": ["/nowhere/d.json"]}}, [],
         "data.data_files: /nowhere/d.json does not exist"),
        ({"data": {"task": "no_such_task"}}, [], ("data.task: cannot make task 'no_such_task' with {}: "
                                                  "unknown task 'no_such_task'; available:")),
        ({"data": {"task": "mqar", "task_kwargs": {"n_pairz": 3}}}, [],
         "data.task: cannot make task 'mqar' with {'n_pairz': 3}: task 'mqar' has no parameter 'n_pairz'"),
        ({}, ["--graft.r", "0"], "graft.r: must be an integer >= 1, got 0"),
        ({}, ["--graft.dropout", "1.5"], "graft.dropout: must be a finite number in [0.0, 1.0), got 1.5"),
        ({"graft": {"type": "echo", "chunk_size": 0}}, [], "graft.chunk_size: must be an integer >= 1, got 0"),
        ({"graft": {"type": "echo", "mode": "parallel", "distill_weight": 0.5}}, [],
         "graft.distill_weight: needs mode='replace'"),
        ({"graft": {"type": "sst", "blend_min": 0.2, "blend_max": 0.1}}, [],
         "graft.blend_max: must be above blend_min=0.2, got 0.1"),
        ({"graft": {"type": "sst", "state_source": "bogus"}}, [], "graft.state_source: must be one of ffn_output, residual"),
        ({"graft": {"type": "range_search", "reservoir_size": 0}}, [], "graft.reservoir_size: must be an integer >= 1"),
        ({"graft": {"type": "attractor", "attn_heads": 0, "tol": -1}}, [],
         "graft.attn_heads: must be an integer >= 1, got 0\n  graft.tol: must be a finite number >= 0.0, got -1.0"),
        ({"graft": {"type": "lora", "adapter_name": "../x"}}, [],
         "graft.adapter_name: '../x' is not a valid adapter name"),
        ({"train": {"resume_from": "/nowhere/step-3"}}, [], "train.resume_from: no checkpoint directory at /nowhere"),
    ],
)
def test_bad_recipes_exit_2_naming_the_problem(recipe_file, capsys, sections, overrides, message):
    code, err = dry_run(capsys, recipe_file(**sections), *overrides)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_the_input_checks_report_every_problem_at_once(tmp_path):
    recipe = build_recipe({"model": {"name": "tiny"}, "graft": {"type": "lora"},
                           "data": {"dataset": str(tmp_path / "a.jsonl"), "eval_dataset": str(tmp_path / "b.jsonl")},
                           "train": {"resume_from": str(tmp_path / "ckpt")}})
    with pytest.raises(RecipeError) as info:
        check_recipe_inputs(recipe)
    assert str(info.value).count("\n  ") == 3


def test_the_command_line_prints_no_traceback(recipe_file):
    path = recipe_file(graft={"type": "echo", "chunk_size": 0})
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "graftlm", "train", path, "--dry-run"], check=False,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2
    assert "graft.chunk_size: must be an integer >= 1, got 0" in done.stderr and "Traceback" not in done.stderr
