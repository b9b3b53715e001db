"""Reports: JSON, markdown and PNG files for single results, sweeps, and systems side by side."""

import json

from graftlm.eval.report import comparison_table, markdown_table, write_comparison, write_report


def _result(accuracy, **task_kwargs):
    records = [{"correct": i < round(accuracy * 4)} for i in range(4)]
    return {"task": "mqar", "task_kwargs": task_kwargs, "n": 4, "accuracy": accuracy,
            "num_correct": sum(r["correct"] for r in records), "breakdown": {}, "records": records}


def _sweep(accuracies):
    values = [2, 4, 8]
    points = [_result(a, num_pairs=v) for a, v in zip(accuracies, values)]
    return {"task": "mqar", "task_kwargs": {"gap": 0}, "param": "num_pairs", "values": values,
            "accuracies": accuracies, "points": points}


def _read(path):
    with open(path) as handle:
        return handle.read()


def _is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_single_result_writes_json_and_markdown_only(tmp_path):
    result = _result(0.75, num_pairs=4)
    result["breakdown"] = {"depth": {"0.0": 1.0, "1.0": 0.5}}
    paths = write_report(result, str(tmp_path), name="single", label="frozen base")
    assert set(paths) == {"json", "markdown"}
    assert json.loads(_read(paths["json"]))["accuracy"] == 0.75
    text = _read(paths["markdown"])
    assert "frozen base" in text and "| mqar | num_pairs=4 | 4 | 0.750 |" in text and "| 1.0 | 0.500 |" in text


def test_sweep_writes_a_png_and_a_row_per_value(tmp_path):
    paths = write_report(_sweep([1.0, 0.5, 0.25]), str(tmp_path), name="curve")
    assert _is_png(paths["png"])
    table = markdown_table(_sweep([1.0, 0.5, 0.25]))
    assert "| 4 | 0.500 | 2 / 4 |" in table and "| 8 | 0.250 | 1 / 4 |" in table


def test_systems_side_by_side(tmp_path):
    systems = {"frozen base": _sweep([0.5, 0.25, 0.0]), "LoRA same budget": _sweep([0.75, 0.5, 0.25]),
               "graft": _sweep([1.0, 1.0, 0.75])}
    paths = write_comparison(systems, str(tmp_path))
    assert _is_png(paths["png"])
    lines = _read(paths["markdown"]).splitlines()
    assert lines[0] == "| num_pairs | frozen base | LoRA same budget | graft |"
    assert lines[3] == "| 4 | 0.250 | 0.500 | 1.000 |"
    assert set(json.loads(_read(paths["json"]))) == set(systems)
    single = comparison_table({"frozen base": _result(0.25), "graft": _result(0.75)})
    assert single.splitlines()[-1] == "| mqar (-) | 0.250 | 0.750 |"
