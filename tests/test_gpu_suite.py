"""`benchmarks/gpu_suite.py --device cpu --quick` runs every section end to end and every check passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.slow
def test_quick_suite_runs_every_section_on_a_cpu(tmp_path):
    out = tmp_path / "suite.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--device", "cpu", "--quick", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["section"] for r in rows} == {"graft", "triton", "attention", "recipe"}
    grafts = {r["case"].split()[-1]: r for r in rows if r["section"] == "graft"}
    assert set(grafts) == {"base", "sst", "attractor", "echo", "echo_replace", "lora", "range_search"}
    for name, r in grafts.items():
        assert "error" not in r and r["decode_ms"] > 0, (name, r)
        if name != "base":
            assert r["exact"] is True, name
    for name in ("sst", "echo", "echo_replace", "lora"):
        assert grafts[name]["decode_syncs"] == "0", (name, grafts[name]["decode_syncs"])
        assert grafts[name]["train_ms"] > 0
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]  # every row says whether it passed
    assert "| case | ok |" in done.stdout
