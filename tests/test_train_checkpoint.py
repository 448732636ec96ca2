"""Checkpoints: restore on other meshes, resume equals an uninterrupted run, a kill during an async save."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.config import ModelConfig
from flexattn_jax.sharding import make_mesh
from tests.fixtures import TEST_BATCH, TEST_SEQ_LEN, random_params, small_train_config, tiny_config, to_host, write_llava_dataset
from train.checkpoint import Checkpointer
from train.config import DataConfig
from train.data import TrainData
from train.loop import train
from train.step import make_step

CFG = tiny_config()
WARM = dataclasses.replace(CFG, flex=dataclasses.replace(CFG.flex, warmup=0.25))  # an alpha warm-up over 4 epochs
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    write_llava_dataset(root, seed=0, n=16, hr_size=84, obj_px=6)
    return root


def data_for(root, tokenizer, cfg=CFG):
    dcfg = DataConfig(data=str(root / "data.json"), images=str(root), max_len=TEST_SEQ_LEN, seed=5)
    return TrainData(cfg, dcfg, tokenizer, TEST_BATCH, num_steps=30), dcfg


@pytest.mark.slow
def test_restore_on_other_meshes_and_resume(tmp_path, dataset):
    tok = build_demo_tokenizer()
    mesh8 = make_mesh("data=8,fsdp=1,tensor=1")
    params = random_params(WARM, seed=2)
    tcfg = small_train_config(save_every=2, stop_at=4)
    data, dcfg = data_for(dataset, tok, WARM)
    final, recs = train(WARM, params, data, tcfg, mesh8, out_dir=tmp_path / "a", data_config=dcfg, log=False)
    losses = [r["loss"] for r in recs]
    assert len(losses) == 4
    # 16 samples / batch 8 = 2 steps per epoch; warmup 0.25: alpha = (steps done) / 2 x 0.25, across the epoch boundary
    assert [r["alpha"] for r in recs] == pytest.approx([0.0, 0.125, 0.25, 0.375])
    assert [r["epoch"] for r in recs] == [0, 0, 1, 1]

    # resume from the step-2 checkpoint written while the run went on (state + data position)
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    data_b, _ = data_for(dataset, tok, WARM)
    _, recs_b = train(WARM, None, data_b, tcfg, mesh8, out_dir=tmp_path / "b", data_config=dcfg, log=False)
    assert [r["step"] for r in recs_b] == [3, 4]
    assert [r["alpha"] for r in recs_b] == pytest.approx([0.25, 0.375])  # the resumed run continues the warm-up
    np.testing.assert_allclose([r["loss"] for r in recs_b], losses[2:], rtol=0, atol=1e-6)

    # the 8-device checkpoint restores on 4 devices and on 1, identically
    ref = to_host(final)
    with Checkpointer(tmp_path / "a" / "checkpoints") as ck:
        assert ck.all_steps() == [2, 4]
        meta = ck.read_meta()
        assert meta["step"] == 4 and ModelConfig.from_dict(meta["model_config"]) == WARM and "converter_version" in meta
        for mesh in (make_mesh("data=1,fsdp=4,tensor=1", devices=jax.devices()[:4]),
                     make_mesh("data=1,fsdp=1,tensor=1", devices=jax.devices()[:1])):
            state, _ = ck.restore(make_step(WARM, tcfg, mesh, tcfg.steps).abstract_state)
            assert int(state.step) == 4
            leaf = state.params["text"]["layers"]["mlp"]["gate"]["kernel"]
            assert leaf.sharding.mesh.size == mesh.size
            for a, b in zip(jax.tree.leaves(to_host(state.params)), jax.tree.leaves(ref), strict=True):
                assert np.array_equal(a, b)


_CHILD = """
import asyncio, os, sys
from orbax.checkpoint._src.path import atomicity

SLOW = os.environ["FLEXATTN_TEST_SLOW_STEP"]

def _patch(cls):
    orig = cls.finalize

    async def finalize(self, *args, **kwargs):
        if self._final_path.name == SLOW:  # hold the commit of this step: the parent kills us here
            print("FINALIZING", SLOW, flush=True)
            await asyncio.sleep(600)
        return await orig(self, *args, **kwargs)

    cls.finalize = finalize

for name in ("AtomicRenameTemporaryPath", "CommitFileTemporaryPath"):
    if hasattr(atomicity, name):
        _patch(getattr(atomicity, name))
from train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli_args(dataset, cfg_json, out):
    return [
        "--init", "random", "--config-json", str(cfg_json), "--data", str(dataset / "data.json"), "--images", str(dataset),
        "--max-len", str(TEST_SEQ_LEN), "--batch-size", str(TEST_BATCH), "--steps", "30", "--lr", "1e-2", "--adam-eps", "1e-3",
        "--warmup-steps", "0", "--mesh", "data=8", "--out", str(out), "--save-every", "1", "--no-progress", "--no-tensorboard",
    ]


@pytest.mark.slow
def test_kill_during_async_save_then_resume(tmp_path, dataset):
    cfg_json = tmp_path / "tiny.json"
    cfg_json.write_text(CFG.to_json())
    out = tmp_path / "run"
    env = dict(os.environ, FLEXATTN_TEST_SLOW_STEP="3", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *cli_args(dataset, cfg_json, out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("FINALIZING 3"):
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert time.time() < deadline, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert any(x.startswith("FINALIZING 3") for x in lines), "".join(lines)
    ckdir = out / "checkpoints"
    assert any(p.name.startswith("3.") for p in ckdir.iterdir()), list(ckdir.iterdir())  # the interrupted write

    with Checkpointer(ckdir) as ck:
        assert ck.latest_step() == 2
        assert ck.read_meta()["step"] == 2

    from train.cli import main

    assert main([*cli_args(dataset, cfg_json, out), "--stop-at", "3"]) == 0
    with Checkpointer(ckdir) as ck:
        assert ck.all_steps()[-1] == 3
    # the killed run had logged step 3, not saved it: the resumed run logs it again, once (the first line superseded)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    superseded = [json.loads(x) for x in (out / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and superseded and superseded[0]["step"] == 3
    assert all(r["step"] >= 3 for r in superseded)
    assert records[-1]["loss"] == pytest.approx(superseded[0]["loss"], abs=1e-6)
