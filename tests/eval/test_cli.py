"""The ``graftlm eval`` hook: argument parsing and a full run with a stand-in loader."""

import argparse
import json
import os

import pytest

from graftlm.eval.runner import add_eval_arguments, run_eval_cli


def _parse(argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_arguments_are_typed():
    args = _parse(["--task", "mqar", "--task-arg", "num_pairs=8", "--task-arg", "gap=64", "--sweep",
                   "num_pairs=2,4", "--n", "3", "--out", "x"])
    assert dict(args.task_args) == {"num_pairs": 8, "gap": 64}
    assert args.sweep == ("num_pairs", [2, 4]) and args.n == 3 and args.adapter is None


def test_malformed_task_argument_is_an_error(capsys):
    with pytest.raises(SystemExit):
        _parse(["--task-arg", "novalue"])
    assert "expected key=value" in capsys.readouterr().err


def test_sweep_run_writes_a_report(tmp_path, tiny_llama, byte_tokenizer, capsys):
    loaded = []

    def load_model(name):
        loaded.append(name)
        return tiny_llama, byte_tokenizer

    args = _parse(["--model", "tiny", "--task", "mqar", "--task-arg", "num_queries=1", "--sweep", "num_pairs=1,2",
                   "--n", "2", "--batch-size", "2", "--out", str(tmp_path), "--no-progress"])
    assert run_eval_cli(args, load_model) == 0
    assert loaded == ["tiny"]
    assert sorted(os.listdir(tmp_path)) == ["mqar_sweep_num_pairs.json", "mqar_sweep_num_pairs.md",
                                            "mqar_sweep_num_pairs.png"]
    saved = json.loads((tmp_path / "mqar_sweep_num_pairs.json").read_text())
    assert saved["values"] == [1, 2] and saved["system"] == "tiny" and len(saved["points"][1]["records"]) == 2
    assert "| num_pairs | accuracy |" in capsys.readouterr().out


def test_adapter_needs_a_loader_and_is_applied_when_given(tmp_path, tiny_llama, byte_tokenizer):
    args = _parse(["--adapter", "some/dir", "--task", "chain_sum", "--n", "1", "--out", str(tmp_path),
                   "--no-progress"])
    with pytest.raises(SystemExit, match="adapter loader"):
        run_eval_cli(args, lambda name: (tiny_llama, byte_tokenizer))
    attached = []

    def load_adapter(model, path):
        attached.append(path)
        return model

    assert run_eval_cli(args, lambda name: (tiny_llama, byte_tokenizer), load_adapter) == 0
    assert attached == ["some/dir"] and (tmp_path / "chain_sum.json").exists()


def test_unknown_task_or_parameter_stops_with_a_message(tmp_path, tiny_llama, byte_tokenizer):
    loader = lambda name: (tiny_llama, byte_tokenizer)
    with pytest.raises(SystemExit, match="unknown task 'nope'"):
        run_eval_cli(_parse(["--task", "nope", "--out", str(tmp_path)]), loader)
    with pytest.raises(SystemExit, match="no parameter 'pairs'"):
        run_eval_cli(_parse(["--task", "mqar", "--task-arg", "pairs=2", "--out", str(tmp_path)]), loader)
