"""Two CPU processes x 4 devices (jax.distributed, process-local data) train exactly like one process x 8."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import TEST_BATCH, TEST_SEQ_LEN, tiny_config, write_llava_dataset

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    write_llava_dataset(tmp_path, seed=0, n=16, hr_size=84, obj_px=6)
    cfg_json = tmp_path / "tiny.json"
    cfg_json.write_text(tiny_config().to_json())
    args = [sys.executable, "-m", "train", "--init", "random", "--config-json", str(cfg_json),
            "--data", str(tmp_path / "data.json"), "--images", str(tmp_path), "--max-len", str(TEST_SEQ_LEN),
            "--batch-size", str(TEST_BATCH), "--steps", "3",
            "--lr", "3e-3", "--mesh", "data=2,fsdp=4", "--save-every", "2", "--no-progress", "--no-tensorboard"]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = [
        subprocess.Popen([*args, "--out", str(tmp_path / "multi"), "--coordinator", f"localhost:{port}", "--num-processes", "2",
                          "--process-id", str(i)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
        for i in range(2)
    ]
    logs = [p.communicate(timeout=500)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    single = subprocess.run([*args, "--out", str(tmp_path / "single")], cwd=REPO, capture_output=True, text=True, timeout=500,
                            env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert single.returncode == 0, single.stdout + single.stderr

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("multi") == pytest.approx(losses("single"), abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints" / "3" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
