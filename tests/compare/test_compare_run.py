"""`graftlm compare` end to end on a tiny model: the same examples for every system, budgets matched,
variants scored, paired statistics, resume, and the JSON / markdown / PNG report."""

import json
from pathlib import Path

import pytest
from graft_fixtures import save_tiny_byte_model

from graftlm.cli import main as graftlm_main
from graftlm.compare import build_compare_spec, run_compare
from graftlm.compare.spec import quick_overrides
from graftlm.recipes.config import RecipeError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_byte_model(tmp_path_factory.mktemp("tiny") / "model"))


def spec_raw(model_dir, out):
    return {
        "name": "tiny compare",
        "model": {"name": model_dir},
        "data": {"task": "basic_arithmetic", "task_kwargs": {"difficulty": 2, "shots": 1}, "n_train": 24,
                 "n_eval": 4, "max_length": 512},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "progress_bar": False, "log_every": 1},
        "evals": [{"task": "basic_arithmetic", "task_kwargs": {"difficulty": 2, "shots": 1}, "n": 6,
                   "batch_size": 3, "max_new_tokens": 3}],
        "reference": "LoRA r=2",
        "pairs": [["SST", "LoRA, SST's budget"], ["SST [exact prefill]", "SST"]],
        "systems": [
            {"name": "frozen base"},
            {"name": "LoRA r=2", "graft": {"type": "lora", "r": 2}},
            {"name": "SST", "graft": {"type": "sst"}, "train": {"lr": 3e-2},
             "variants": {"exact prefill": {"prefill_mode": "exact"}}},
            {"name": "LoRA, SST's budget", "graft": {"type": "lora", "target_modules": ["v_proj"]},
             "budget_of": "SST"},
        ],
        "output_dir": str(out),
    }


def test_compare_runs_every_system_on_the_same_examples(tiny_dir, tmp_path):
    spec = build_compare_spec(spec_raw(tiny_dir, tmp_path / "out"))
    report = run_compare(spec, progress=False, command="graftlm compare tiny.yaml")
    table = report["tables"][spec.evals[0].name]
    rows = {row["system"]: row for row in table}
    assert set(rows) == {"frozen base", "LoRA r=2", "SST", "SST [exact prefill]", "LoRA, SST's budget"}
    assert rows["LoRA r=2"]["reference"] and "vs_reference" not in rows["LoRA r=2"]
    for name, row in rows.items():
        assert row["n"] == 6 and 0 <= row["ci"][0] <= row["accuracy"] <= row["ci"][1] <= 1
        if name != "LoRA r=2":
            assert 0 <= row["vs_reference"]["p"] <= 1 and row["vs_reference"]["test"] == "exact McNemar"
    records = {r["system"]: r for r in report["records"]}
    sst_params = records["SST"]["trainable_params"]
    budget = records["LoRA, SST's budget"]
    assert budget["grafts"][0]["r"] >= 1 and abs(budget["trainable_params"] - sst_params) <= 64 * 2 * 2
    assert records["frozen base"]["trainable_params"] == 0 and records["frozen base"]["training"] is None
    examples = {len(r["evals"][spec.evals[0].name]["correct"]) for r in report["records"]}
    assert examples == {6}
    assert report["data_info"]["train_examples"] + report["data_info"]["held_out_for_eval_loss"] <= 24
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["name"] == "tiny compare"
    markdown = (out / "report.md").read_text()
    assert "| LoRA, SST's budget |" in markdown and "graftlm compare tiny.yaml" in markdown and "Verdict" in markdown
    assert (out / "report.png").stat().st_size > 0
    pairs = report["pairs"][spec.evals[0].name]
    assert [(p["system"], p["versus"]) for p in pairs] == [("SST", "LoRA, SST's budget"), ("SST [exact prefill]", "SST")]
    assert all(0 <= p["p"] <= 1 and p["test"] == "exact McNemar" for p in pairs)
    assert "| SST vs LoRA, SST's budget |" in markdown
    assert (out / "sst" / "seed0" / "run" / "adapter" / "adapter_model.safetensors").exists()

    again = run_compare(spec, resume=True, progress=False)
    assert [r["wall_s"] for r in again["records"]] == [r["wall_s"] for r in report["records"]]
    assert again["wall_s"] >= round(sum(r["wall_s"] for r in report["records"]), 1) - 0.1  # reused runs count

    saved = records["SST"]["adapter_dir"]
    raw = spec_raw(tiny_dir, tmp_path / "loaded")
    raw["systems"] = [{"name": "frozen base"}, {"name": "saved SST", "adapter": saved}]
    raw["reference"] = "frozen base"
    del raw["pairs"]
    loaded = run_compare(build_compare_spec(raw), progress=False)
    reloaded = {r["system"]: r for r in loaded["records"]}["saved SST"]
    name = spec.evals[0].name
    assert reloaded["evals"][name]["completions"] == records["SST"]["evals"][name]["completions"]
    assert reloaded["evals"][name]["answer_nll"] == records["SST"]["evals"][name]["answer_nll"]
    assert reloaded["trainable_params"] == sst_params


def test_spec_validation_names_each_problem(tiny_dir, tmp_path):
    raw = spec_raw(tiny_dir, tmp_path)
    raw["systems"][1]["train"] = {"steps": 50, "lr": 1e-2}
    raw["systems"][2]["graft"] = {"type": "sst", "blend_nonsense": 1}
    raw["systems"][3]["budget_of"] = "nobody"
    raw["reference"] = "missing"
    raw["bogus"] = 1
    with pytest.raises(RecipeError) as info:
        build_compare_spec(raw)
    message = str(info.value)
    assert "bogus: unknown key" in message
    assert "systems.1.train.steps: a system may change only optimisation settings" in message
    assert "budget_of: 'nobody' is not another trained system" in message
    assert "reference: 'missing' is not a system" in message
    assert "systems.SST: graft.blend_nonsense: unknown key" in message


def test_quick_overrides_shrink_a_spec_but_keep_its_systems(tiny_dir, tmp_path):
    raw = spec_raw(tiny_dir, tmp_path)
    raw["train"]["steps"], raw["seeds"], raw["evals"][0]["n"] = 300, [0, 1, 2], 300
    raw["data"]["mix"] = [{"task": "mqar", "n_train": 500, "n_eval": 50}]
    quick = build_compare_spec(quick_overrides(raw))
    assert quick.train["steps"] == 2 and quick.seeds == [0] and quick.evals[0].n == 8
    assert quick.data.mix == [{"task": "mqar", "n_train": 16, "n_eval": 4}] and raw["data"]["mix"][0]["n_train"] == 500
    assert [s.name for s in quick.systems] == [s["name"] for s in raw["systems"]]
    assert Path(quick.output_dir) == Path(build_compare_spec(raw).output_dir) / "quick"  # a full run's report is safe


def test_cli_dry_run_and_bad_spec_exit_codes(tiny_dir, tmp_path, capsys):
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_raw(tiny_dir, tmp_path / "out")))
    assert graftlm_main(["compare", str(path), "--dry-run", "--train.steps", "7"]) == 0
    assert "steps: 7" in capsys.readouterr().out
    assert graftlm_main(["compare", str(path), "--dry-run", "--train.batch_size", "0"]) == 2
    assert "train.batch_size: must be >= 1" in capsys.readouterr().err


def test_budget_of_sizes_the_lora_of_a_stack_and_counts_its_other_grafts(tiny_dir, tmp_path):
    """A window-only Echo (no parameters) + LoRA sized to an Echo system's budget, trained on a task with a
    second task mixed in; the stack's trainable count lands within one LoRA rank of the target's."""
    from graftlm.recipes.budget import lora_params_per_rank

    echo = {"type": "echo", "mode": "replace", "rank": 2, "chunk_size": 4, "window": 4, "distill_weight": 1.0}
    mlp = ["gate_proj", "up_proj", "down_proj"]
    raw = spec_raw(tiny_dir, tmp_path / "out")
    raw["data"]["mix"] = [{"task": "mqar", "task_kwargs": {"num_pairs": 2, "num_queries": 1}, "n_train": 8,
                           "n_eval": 2}]
    raw["reference"] = "Echo"
    del raw["pairs"]
    raw["systems"] = [{"name": "Echo", "graft": echo},
                      {"name": "window only + LoRA", "budget_of": "Echo",
                       "graft": [{**echo, "echo_branch": False}, {"type": "lora", "target_modules": mlp}]}]
    report = run_compare(build_compare_spec(raw), progress=False)
    records = {r["system"]: r for r in report["records"]}
    control = records["window only + LoRA"]
    assert control["grafts"][0]["echo_branch"] is False and control["grafts"][1]["r"] >= 1
    from graftlm.models import load_model

    per_rank = lora_params_per_rank(load_model(tiny_dir)[0], mlp)
    assert abs(control["trainable_params"] - records["Echo"]["trainable_params"]) <= per_rank // 2 + 1
    info = report["data_info"]  # the task's 24 training examples less overlaps with the eval, the mix's 8
    assert info["train_examples"] + info["dropped_as_eval_overlap"] == 24 + 8
    assert info["held_out_for_eval_loss"] == 4 + 2
    raw["systems"][1]["graft"].append({"type": "lora", "r": 2})
    with pytest.raises(RecipeError, match="needs exactly one LoRA graft to size to the budget, it has 2"):
        build_compare_spec(raw)


def test_no_progress_hides_the_training_bar_too(tiny_dir, tmp_path, capsys):
    raw = spec_raw(tiny_dir, tmp_path / "out")
    raw["train"]["progress_bar"] = True
    raw["systems"], raw["reference"], raw["pairs"] = raw["systems"][1:2], "LoRA r=2", []
    run_compare(build_compare_spec(raw), progress=False)
    assert "train:" not in capsys.readouterr().err


def test_an_untrained_system_may_have_no_parameters_but_a_trained_one_may_not(tiny_dir, tmp_path):
    """The window-only Echo (echo_branch false) has nothing to train: scored as an untrained system it is the
    windowed base; asked to train, the run stops with the reason instead of doing nothing."""
    window_only = {"type": "echo", "mode": "replace", "echo_branch": False, "chunk_size": 4, "window": 4}
    raw = spec_raw(tiny_dir, tmp_path / "out")
    raw["systems"] = [{"name": "frozen base"}, {"name": "window only", "graft": window_only, "untrained": True}]
    raw["reference"], raw["pairs"] = "frozen base", []
    spec = build_compare_spec(raw)
    report = run_compare(spec, progress=False)
    record = {r["system"]: r for r in report["records"]}["window only"]
    assert record["trainable_params"] == 0 and record["training"] is None
    assert len(record["evals"][spec.evals[0].name]["correct"]) == 6
    raw["systems"][1] = {"name": "window only", "graft": window_only}
    with pytest.raises(RecipeError, match="no trainable parameters"):
        run_compare(build_compare_spec(raw), progress=False)
