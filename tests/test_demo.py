"""The README's main job (`graftlm demo`) end to end on the embedded SmolLM2, shortened."""

import json

import pytest

from graftlm.demo import run_demo

pytestmark = pytest.mark.integration


def test_demo_runs_and_its_checks_hold(tmp_path):
    report = run_demo("smollm2-135m", tmp_path, quick=True, steps=2, n_eval=8)
    assert report["ok"], report["rows"]
    assert set(report["scores"]) == {"frozen base", "SST", "LoRA, SST's budget"}
    for score in report["scores"].values():
        assert score["n"] == 8 and score["ci"][0] <= score["accuracy"] <= score["ci"][1]
    rows = dict(report["rows"])
    assert rows["reloaded adapter: logits identical"] == "True"
    assert rows["reloaded adapter: generations identical"] == "True"
    assert "McNemar p=" in rows["chain_sum accuracy: SST"] and "significant (p < 0.05)" in rows
    assert any(key.startswith("range search") for key in rows)
    assert json.loads((tmp_path / "report.json").read_text())["ok"]
    assert "| SST vs LoRA, SST's budget |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "scores.png").stat().st_size > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
