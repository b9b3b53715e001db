"""The README's main job (`graftlm demo`) end to end on the embedded SmolLM2, shortened."""

import json

import pytest

from graftlm.demo import run_demo

pytestmark = pytest.mark.integration


def test_demo_runs_and_its_checks_hold(tmp_path):
    report = run_demo("smollm2-135m", tmp_path, quick=True, steps=2, n_eval=8)
    assert report["ok"], report["rows"]
    assert set(report["scores"]) == {"frozen base", "sst", "LoRA, same budget"}
    rows = dict(report["rows"])
    assert rows["reloaded adapter: logits identical"] == "True"
    assert any(key.startswith("range search") for key in rows)
    assert json.loads((tmp_path / "report.json").read_text())["ok"]
    assert (tmp_path / "scores.png").stat().st_size > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
