"""Logging and progress: one configuration, library loggers on stderr, progress bars as plain lines off a terminal."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexattn_jax.logs import LOG_ENV, PACKAGES, configure_logging, progress
from tests.fixtures import TEST_BATCH, TEST_SEQ_LEN, tiny_config, write_llava_dataset

REPO = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_is_plain_lines():
    buf = io.StringIO()
    t0 = time.perf_counter()
    with progress(total=300, desc="work", unit="step", file=buf, interval=0.05) as bar:
        for i in range(300):
            time.sleep(0.001)
            bar.update(1)
            bar.set_postfix(loss=f"{i:.2f}", refresh=False)
    elapsed = time.perf_counter() - t0
    text = buf.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 2 <= len(lines) <= 3 + elapsed / 0.05, lines  # the first, one per interval at most, the last
    assert all(line.startswith("work: ") for line in lines)
    assert re.search(r"100% 300/300 step .*loss=299\.00", lines[-1]), lines[-1]
    live = _Terminal()
    with progress(total=3, desc="work", file=live, interval=0.0) as bar:
        for _ in range(3):
            bar.update(1)
    assert "\r" in live.getvalue()  # a terminal keeps tqdm's live bar


@pytest.fixture
def restore_logging():
    """The root handlers and this project's logger levels as they were before the test."""
    root = logging.getLogger()
    before = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in PACKAGES}
    yield root, before
    for h in list(root.handlers):
        if h not in before:
            root.removeHandler(h)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_configure_logging_level_env_and_one_handler(monkeypatch, restore_logging):
    root, before = restore_logging
    buf = io.StringIO()
    monkeypatch.setenv(LOG_ENV, "warning")
    assert configure_logging(stream=buf) == logging.WARNING
    assert configure_logging("debug", stream=buf) == logging.DEBUG  # again: replaces its handler
    ours = [h for h in root.handlers if getattr(h, "flexattn_jax", False)]
    assert len(ours) == 1 and ours[0].stream is buf  # one handler of ours, whatever an earlier test left
    assert [h for h in root.handlers if h not in ours] == [h for h in before if not getattr(h, "flexattn_jax", False)]
    logging.getLogger("train.cli").debug("a %s record", "debug")
    logging.getLogger("some.other.library").info("not shown")  # other libraries stay at warning
    assert re.fullmatch(r"\d\d:\d\d:\d\d DEBUG train\.cli: a debug record\n", buf.getvalue()), buf.getvalue()
    with pytest.raises(ValueError, match="--log-level 'loud': use one of debug, info, warning, error"):
        configure_logging("loud")


def test_cli_log_level_flag(capsys, restore_logging):
    from flexattn_jax.app.cli import main

    assert main(["--log-level", "loud", "train"]) == 2
    assert capsys.readouterr().err.strip() == "error: --log-level 'loud': use one of debug, info, warning, error"
    assert main(["--log-level"]) == 2 and "--log-level needs a level" in capsys.readouterr().err
    assert main(["--log-level=warning", "--help"]) == 0 and logging.getLogger("train").level == logging.WARNING
    assert "--log-level" in capsys.readouterr().out


@pytest.mark.slow
def test_train_on_a_pipe_logs_lines_and_keeps_results_on_stdout(tmp_path):
    """`flexattn-jax train` with stderr to a pipe: no carriage return, a bounded number of progress lines, the log's
    records formatted on stderr, the metrics lines and JSON summary on stdout."""
    write_llava_dataset(tmp_path, seed=0, n=16, hr_size=84, obj_px=6)
    cfg_json = tmp_path / "tiny.json"
    cfg_json.write_text(tiny_config().to_json())
    argv = [sys.executable, "-m", "flexattn_jax.app.cli", "train", "--init", "random", "--config-json", str(cfg_json),
            "--data", str(tmp_path / "data.json"), "--images", str(tmp_path), "--max-len", str(TEST_SEQ_LEN),
            "--batch-size", str(TEST_BATCH), "--steps", "12", "--log-every", "4", "--lr", "1e-3", "--mesh", "data=1",
            "--no-tensorboard", "--no-save-final"]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop(LOG_ENV, None)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    bar = [line for line in proc.stderr.splitlines() if re.search(r"\d+/12 step", line)]
    assert 2 <= len(bar) <= 3 + wall / 10, bar  # the first, at most one per 10 s, the last: not one per step
    assert re.search(r"^\d\d:\d\d:\d\d INFO train\.cli: data: 16 samples from ", proc.stderr, re.M), proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    summary = json.loads(next(line for line in out if line.startswith("summary: "))[len("summary: "):])
    steps = summary["steps"]  # 12, or fewer when the data's good samples run out first
    assert steps >= 4 and f" {steps}/12 step" in bar[-1], (steps, bar)
    logged = [line.split(" |")[0] for line in out if line.startswith("step ")]
    assert logged[: steps // 4] == [f"step {4 * i}" for i in range(1, steps // 4 + 1)], out  # the metrics lines, every 4 steps
