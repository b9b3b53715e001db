"""Two CPU processes through `accelerate launch` (DDP over gloo) end with identical adapter weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_two_processes_end_with_identical_adapters(tmp_path):
    # `--cpu` would start one process (accelerate's simple launcher); `--multi_gpu` goes through torchrun and
    # the loop joins the processes over gloo when the machine has no GPU.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(WORKER), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["first_micro_batch"] != ranks[1]["first_micro_batch"]  # each rank saw different data
    assert ranks[0]["lora_B_abs_sum"] > 0  # training moved the weights
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert ranks[0]["summary"]["tokens"] == ranks[1]["summary"]["tokens"] > 0
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(ranks[0]["digests"])
