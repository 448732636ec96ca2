"""Two CPU processes x 4 devices (jax.distributed, process-local data) train exactly like one process x 8, on data
with unusable samples (too long, missing images); they stop together on a SIGTERM to either; a run saved by two
processes resumes on one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import TEST_BATCH, TEST_SEQ_LEN, tiny_config, write_llava_dataset

REPO = Path(__file__).resolve().parents[1]
MISSING = (2, 5, 6, 7, 23)  # records whose image file is gone (most early: unevenly spread over any slicing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The data under its own folder (outputs go beside it: --out may not lie inside an input) and the CLI args."""
    root = tmp_path_factory.mktemp("multihost")
    data = root / "in"
    write_llava_dataset(data, seed=0, n=40, hr_size=84, obj_px=6)
    records = json.loads((data / "data.json").read_text())
    for i in MISSING:
        (data / records[i]["image"]).unlink()
    cfg_json = root / "tiny.json"
    cfg_json.write_text(tiny_config().to_json())
    args = [sys.executable, "-m", "train", "--init", "random", "--config-json", str(cfg_json), "--data", str(data / "data.json"),
            "--images", str(data), "--max-len", str(TEST_SEQ_LEN), "--batch-size", str(TEST_BATCH), "--lr", "3e-3",
            "--mesh", "data=2,fsdp=4", "--no-progress", "--no-tensorboard"]
    return root, args


def _env(devices: int) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _start_two(args: list[str]) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen([*args, "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(4))
            for i in range(2)]


def _finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(setup):
    root, args = setup
    # two processes stop at step 2 of 4 (--stop-at), then one process continues that run to step 4
    logs = _finish(_start_two([*args, "--steps", "4", "--stop-at", "2", "--save-every", "1", "--out", str(root / "multi")]))
    assert "too_long" in logs[0] and "missing_image" in logs[0], logs[0]
    assert all("steps" in x for x in logs[:1]), logs
    resumed = subprocess.run([*args, "--steps", "4", "--save-every", "1", "--out", str(root / "multi")], cwd=REPO,
                             capture_output=True, text=True, timeout=900, env=_env(8))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    single = subprocess.run([*args, "--steps", "4", "--save-every", "0", "--out", str(root / "single")], cwd=REPO,
                            capture_output=True, text=True, timeout=900, env=_env(8))
    assert single.returncode == 0, single.stdout + single.stderr
    ref, got = _losses(root / "single"), _losses(root / "multi")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    print(json.dumps({"two_processes_then_one": got, "one_process": ref,  # the figures of docs/multihost.md (pytest -s)
                      "max_abs_diff": max(abs(got[s] - ref[s]) for s in ref)}))
    assert [got[s] for s in (1, 2, 3, 4)] == pytest.approx([ref[s] for s in (1, 2, 3, 4)], abs=1e-5)
    summary = json.loads(single.stdout.split("summary: ")[-1])
    assert summary["data"]["skipped"]["missing_image"] == len(MISSING) and summary["data"]["skipped"]["too_long"] > 0


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_with_a_saved_step(setup):
    root, args = setup
    out = root / "term"
    procs = _start_two([*args, "--steps", "200", "--save-every", "1000", "--out", str(out)])
    deadline = time.time() + 400
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert all(p.poll() is None for p in procs), _finish(procs)
        time.sleep(1)
    procs[1].send_signal(signal.SIGTERM)
    logs = _finish(procs, timeout=300)
    assert procs[1].returncode == 143 and procs[0].returncode == 130, logs
    assert "another process of the run was asked to stop" in logs[0] and "interrupted" in logs[1], logs
    saved = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 200 and f"checkpoint of step {saved[0]} saved" in logs[0] + logs[1], logs
    assert max(_losses(out)) == saved[0]


def test_step_agreement_between_two_processes():
    """The word before each step: a stop and the longest batch reach both processes, a failure names its process,
    and a process that leaves without a word is named after the bounded wait (no collective hangs)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "agreement_worker.py"), str(port), str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(_env(1), PYTHONPATH=str(REPO)))
             for i in range(2)]
    logs = _finish(procs, timeout=300)
    lines = [json.loads(x) for x in logs[0].splitlines() if x.startswith(("[", "{"))]
    assert lines[:3] == [["go", 9], ["stop", 16], ["go", 4]], logs
    assert lines[3] == {"error": "process 1 of 2 stopped before step 2: DataError: sample 'x' [bad_image]"}, logs
    assert lines[4]["error"].startswith("process 1 of 2 did not reach step 1 within 3 s (dead or stuck"), logs
    assert procs[0].returncode == 0, logs
