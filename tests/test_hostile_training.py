"""Hostile inputs to ``train`` and ``demo`` (issue 17): a table of cases, each a clear one-line error with the
documented exit status, no traceback, no partial output and its inputs untouched; plus the resume fixes
(a damaged latest checkpoint is skipped, metrics.jsonl has each step once, a shape mismatch names the
parameter and the setting) and the FlexAttention kernels' init of a plain LLaVA checkpoint (--hr-init)."""

from __future__ import annotations

import dataclasses
import hashlib
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

from flexattn_jax.app.cli import main as cli_main
from flexattn_jax.params import add_hr_projections, flatten
from tests.fixtures import TEST_BATCH, TEST_SEQ_LEN, random_params, small_train_config, tiny_config, write_llava_dataset
from train.checkpoint import Checkpointer, CheckpointMismatch, NoUsableCheckpoint
from train.metrics import truncate_metrics
from train.step import make_step

CFG = tiny_config()
PLAIN = dataclasses.replace(CFG, flex=dataclasses.replace(CFG.flex, enabled=False))


def tree_hash(*paths: Path) -> str:
    """sha256 over the names and bytes of every file under ``paths`` (missing paths hash as absent)."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in Path(root).rglob("*") if p.is_file()) if Path(root).is_dir() else [Path(root)]
        for f in files:
            h.update(str(f.relative_to(root) if f != Path(root) else f.name).encode())
            h.update(f.read_bytes() if f.exists() else b"<absent>")
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, variants of it, a ModelConfig JSON, a converted plain LLaVA and a finished 3-step run."""
    from tests.checkpoints import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("hostile")
    write_llava_dataset(root / "data", seed=0, n=16, hr_size=84, obj_px=6)
    records = json.loads((root / "data" / "data.json").read_text())
    (root / "data" / "missing_images.json").write_text(json.dumps([{**r, "image": "gone/" + r["image"]} for r in records]))
    (root / "data" / "malformed.json").write_text("[{]")
    (root / "data" / "object.json").write_text('{"id": 1}')
    (root / "data" / "empty.json").write_text("[]")
    (root / "tiny.json").write_text(CFG.to_json())
    write_tiny_checkpoint(root / "converted", PLAIN, seed=4, std=0.02)
    (root / "a_file").write_text("not a directory\n")
    run = root / "run"
    assert cli_main(["train", *base_args(root, run), "--stop-at", "3"]) == 0
    shutil.copytree(run, root / "damaged_run")
    for step in ("1", "2", "3"):
        (root / "damaged_run" / "checkpoints" / step / "meta" / "metadata").write_text("{")
    return root


def base_args(root: Path, out: Path | None, data: str = "data.json") -> list[str]:
    args = ["--init", "random", "--config-json", str(root / "tiny.json"), "--data", str(root / "data" / data),
            "--images", str(root / "data"), "--max-len", str(TEST_SEQ_LEN), "--batch-size", str(TEST_BATCH), "--steps", "30",
            "--lr", "1e-2", "--adam-eps", "1e-3", "--warmup-steps", "0", "--mesh", "data=8", "--save-every", "1",
            "--no-async-save", "--no-progress", "--no-tensorboard"]
    return args + (["--out", str(out)] if out is not None else [])


def ckpt_args(root: Path, out: Path) -> list[str]:
    return ["--checkpoint", str(root / "converted"), "--data", str(root / "data" / "data.json"), "--images", str(root / "data"),
            "--max-len", str(TEST_SEQ_LEN), "--batch-size", str(TEST_BATCH), "--mesh", "data=8", "--no-progress",
            "--no-tensorboard", "--out", str(out)]


# (name, command builder (root, out) -> argv, out path (relative to root; None = a fresh 'out'), status,
#  fragments the one error line must contain ('{root}' is replaced))
CASES = [
    ("all samples bad (images missing): exit 2 as --help says",
     lambda r, o: ["train", *base_args(r, o, "missing_images.json"), "--steps", "2"],
     None, 2, ["missing_images.json", "gave no batch", "image", "gone/"]),
    ("--on-error raise on a bad sample",
     lambda r, o: ["train", *base_args(r, o, "missing_images.json"), "--steps", "2", "--on-error", "raise"],
     None, 2, ["gone/", "on_error='raise'"]),
    ("--data missing", lambda r, o: ["train", *base_args(r, o, "nope.json")], None, 2, ["data file not found", "nope.json"]),
    ("--data malformed JSON", lambda r, o: ["train", *base_args(r, o, "malformed.json")], None, 2,
     ["malformed.json", "malformed JSON at line 1"]),
    ("--data a JSON object", lambda r, o: ["train", *base_args(r, o, "object.json")], None, 2, ["object.json", "expected a JSON list"]),
    ("--data an empty list", lambda r, o: ["train", *base_args(r, o, "empty.json")], None, 2, ["empty.json", "no samples"]),
    ("--grounding-weight inf: refused before any work", lambda r, o: ["train", *base_args(r, o), "--grounding-weight", "inf"],
     None, 2, ["grounding_weight=inf must be a finite number >= 0"]),
    ("--grounding-weight nan", lambda r, o: ["train", *base_args(r, o), "--grounding-weight", "nan"],
     None, 2, ["grounding_weight=nan must be a finite number >= 0"]),
    ("--config-json missing", lambda r, o: ["train", *base_args(r, o), "--config-json", str(r / "nope.json")], None, 2,
     ["nope.json"]),
    ("--out is the --images directory", lambda r, o: ["train", *base_args(r, o)], "data", 2, ["--out", "is the input"]),
    ("--out contains the dataset", lambda r, o: ["train", *base_args(r, o)], ".", 2, ["--out", "contains the input"]),
    ("--out inside the --images directory", lambda r, o: ["train", *base_args(r, o)], "data/run", 2,
     ["--out", "data/run", "lies inside the input"]),
    ("--out is the --checkpoint", lambda r, o: ["train", *ckpt_args(r, o)], "converted", 2, ["--out", "is the input", "converted"]),
    ("--out inside the --checkpoint", lambda r, o: ["train", *ckpt_args(r, o)], "converted/run", 2,
     ["--out", "converted/run", "lies inside the input"]),
    ("--out is a file", lambda r, o: ["train", *base_args(r, o)], "a_file", 2, ["--out", "a_file", "not a directory"]),
    ("--out under a file (unwritable)", lambda r, o: ["train", *base_args(r, o)], "a_file/run", 2, ["--out", "a_file"]),
    ("--out on a read-only file system", lambda r, o: ["train", *base_args(r, o)], "/proc/flexattn-run", 2,
     ["--out", "/proc/flexattn-run", "cannot write"]),
    ("resume after changing --set: shape mismatch", lambda r, o: ["train", *base_args(r, o), "--set", "text.intermediate_size=48"],
     "run", 2, ["checkpoints/3", "text/layers/mlp", "text.intermediate_size (checkpoint 64, now 48)", "--set"]),
    ("resume after changing --set: only the changed setting named (flex.hr_ladder list vs tuple is no difference)",
     lambda r, o: ["train", *base_args(r, o), "--set", "text.intermediate_size=48"],
     "run", 2, ["the model config differs in text.intermediate_size (checkpoint 64, now 48); resume"]),
    ("resume with every checkpoint damaged", lambda r, o: ["train", *base_args(r, o)], "damaged_run", 2,
     ["no usable checkpoint", "damaged_run/checkpoints", "3: bad JSON", "1: bad JSON"]),
    ("demo --out is a file", lambda r, o: ["demo", "--out", str(o)], "a_file", 2, ["--out", "a_file", "not a directory"]),
    ("demo --out under a file", lambda r, o: ["demo", "--out", str(o)], "a_file/demo", 2, ["--out", "a_file"]),
    ("demo --out on a read-only file system", lambda r, o: ["demo", "--out", str(o)], "/proc/flexattn-demo", 2,
     ["--out", "cannot write"]),
    ("demo --out a directory with other files", lambda r, o: ["demo", "--out", str(o)], "data", 2,
     ["--out", "not a demo output"]),
]


@pytest.mark.parametrize("name,argv,out_rel,status,fragments", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(world, tmp_path, capsys, name, argv, out_rel, status, fragments):
    out = tmp_path / "out" if out_rel is None else (Path(out_rel) if out_rel.startswith("/") else world / out_rel)
    watched = [world / "data", world / "converted", world / "tiny.json", world / "a_file", world / "run", world / "damaged_run"]
    before = tree_hash(*watched)
    out_existed = out.exists()
    try:
        rc = cli_main(argv(world, out))
    except SystemExit as e:  # argparse-level errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == status, (name, err)
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err  # one error, on one line
    for frag in fragments:
        assert frag.replace("{root}", str(world)) in lines[0], (frag, lines[0])
    assert tree_hash(*watched) == before, "an input changed"
    if not out_existed:
        assert not out.exists(), f"partial output left at {out}"


# ---- resume ---------------------------------------------------------------------------------------------

def _damage_truncate(step_dir: Path) -> None:
    for f in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "truncated array data": (_damage_truncate, "Exception"),
    "missing _METADATA": (lambda d: (d / "state" / "_METADATA").unlink(), "missing file"),
    "bad meta JSON": (lambda d: (d / "meta" / "metadata").write_text('{"step": 3,'), "bad JSON"),
    "bad _METADATA JSON": (lambda d: (d / "state" / "_METADATA").write_text("{oops"), "bad JSON"),
    "empty step directory": (lambda d: [shutil.rmtree(x) if x.is_dir() else x.unlink() for x in list(d.iterdir())], ""),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back(world, tmp_path, kind):
    """restore_latest skips a damaged newest step (says which and why, moves it aside) and restores the one before."""
    damage, reason = DAMAGE[kind]
    ck_dir = tmp_path / "checkpoints"
    shutil.copytree(world / "run" / "checkpoints", ck_dir)
    damage(ck_dir / "3")
    tcfg = small_train_config(save_every=1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    abstract = make_step(CFG, tcfg, mesh, 30).abstract_state
    said: list[str] = []
    with Checkpointer(ck_dir) as ck:
        state, meta = ck.restore_latest(abstract, cfg=CFG, say=said.append)
        assert int(state.step) == 2 and meta["step"] == 2
        assert ck.all_steps() == [1, 2]
    assert len(said) == 1 and str(ck_dir / "3") in said[0] and reason in said[0] and "resuming from step 2" in said[0], said
    assert (ck_dir / "3.corrupt").is_dir() and not (ck_dir / "3").exists()


def test_no_usable_checkpoint_renames_nothing(world, tmp_path):
    ck_dir = tmp_path / "checkpoints"
    shutil.copytree(world / "run" / "checkpoints", ck_dir)
    for step in ("1", "2", "3"):
        (ck_dir / step / "meta" / "metadata").write_text("{")
    before = tree_hash(ck_dir)
    tcfg = small_train_config(save_every=1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    with Checkpointer(ck_dir) as ck, pytest.raises(NoUsableCheckpoint, match=r"no usable checkpoint .*3: bad JSON.*1: bad JSON"):
        ck.restore_latest(make_step(CFG, tcfg, mesh, 30).abstract_state, cfg=CFG)
    assert tree_hash(ck_dir) == before


def test_shape_mismatch_names_parameter_and_setting(world):
    other = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, num_kv_heads=4))
    tcfg = small_train_config(save_every=1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    with Checkpointer(world / "run" / "checkpoints") as ck, pytest.raises(CheckpointMismatch) as e:
        ck.restore_latest(make_step(other, tcfg, mesh, 30).abstract_state, cfg=other)
    msg = str(e.value)
    assert "params/text/layers/attn/k/kernel is (3, 32, 16) there, (3, 32, 32) here" in msg, msg
    assert "text.num_kv_heads (checkpoint 2, now 4)" in msg and "\n" not in msg, msg


def test_resume_past_damaged_checkpoint_logs_each_step_once(world, tmp_path, capsys):
    """A run killed after step 3's metrics with step 3's checkpoint damaged: the CLI resumes from step 2, warns,
    and metrics.jsonl ends with steps 1, 2, 3 once each (the replaced step-3 line kept in metrics.superseded.jsonl)."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    old = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(old) + '\n{"step": 4, "loss": 1.0')  # a line cut by the kill
    _damage_truncate(run / "checkpoints" / "3")
    assert cli_main(["train", *base_args(world, run), "--stop-at", "3"]) == 0
    out = capsys.readouterr().err  # a warning of the log, on stderr
    assert f"skipped damaged checkpoint {run / 'checkpoints' / '3'}" in out and "resuming from step 2" in out, out
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[2]["loss"] == pytest.approx(json.loads(old[2])["loss"], abs=1e-5)  # the same step 3 again
    superseded = (run / "metrics.superseded.jsonl").read_text().splitlines()
    assert len(superseded) == 2 and json.loads(superseded[0])["step"] == 3
    with Checkpointer(run / "checkpoints") as ck:
        assert ck.all_steps() == [1, 2, 3] and ck.read_meta()["step"] == 3
    assert (run / "checkpoints" / "3.corrupt").is_dir()


def test_truncate_metrics(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4)) + "garbage\n")
    assert truncate_metrics(p, 2) == 3
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(p, 2) == 0 and truncate_metrics(tmp_path / "absent.jsonl", 0) == 0
    assert (tmp_path / "metrics.superseded.jsonl").read_text().count("\n") == 3


# ---- --hr-init ------------------------------------------------------------------------------------------

def test_hr_init_default_is_copy_and_random_is_normal():
    from train.cli import add_missing_hr_kernels, build_parser

    assert build_parser().parse_args([]).hr_init == "copy"
    plain = random_params(PLAIN, seed=1)
    copied, added = add_missing_hr_kernels(plain, CFG, "copy", seed=0)
    assert added == ["text/layers/attn/k_hr/kernel", "text/layers/attn/v_hr/kernel"]
    attn = copied["text"]["layers"]["attn"]
    for a, b in (("k_hr", "k"), ("v_hr", "v")):
        np.testing.assert_array_equal(np.asarray(attn[a]["kernel"]), plain["text"]["layers"]["attn"][b]["kernel"])
    rand, _ = add_missing_hr_kernels(random_params(PLAIN, seed=1), CFG, "random", seed=0)
    k_hr = np.asarray(rand["text"]["layers"]["attn"]["k_hr"]["kernel"])
    assert k_hr.shape == plain["text"]["layers"]["attn"]["k"]["kernel"].shape
    assert not np.allclose(k_hr, plain["text"]["layers"]["attn"]["k"]["kernel"]) and 0.015 < k_hr.std() < 0.025
    assert set(flatten(rand)) == set(flatten(copied))
    with pytest.raises(ValueError, match="already have"):
        add_hr_projections(copied)
    with pytest.raises(ValueError, match="unknown HR projection init 'zero'"):
        add_hr_projections(plain, "zero")


def test_hr_init_copy_normed_reads_a_feature_as_the_normed_row_would():
    """k_hr(h) = k(input_norm(h)) for an HR feature h whose RMS is feature_rms, in every layer; v likewise."""
    plain = random_params(PLAIN, seed=1)
    layers = plain["text"]["layers"]
    scale = np.asarray(layers["input_norm"]["scale"]) + np.linspace(0.5, 1.5, layers["input_norm"]["scale"].shape[-1])
    plain = {**plain, "text": {**plain["text"], "layers": {**layers, "input_norm": {"scale": scale}}}}  # not all ones
    h = np.random.default_rng(0).normal(size=(5, scale.shape[-1])).astype(np.float32)
    normed = h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True))  # what the layer's RMSNorm makes of a row
    h = 0.06 * normed  # features of RMS 0.06, as the demo model's projector gives
    grown = add_hr_projections(plain, "copy-normed", feature_rms=0.06)["text"]["layers"]["attn"]
    for hr, name in (("k_hr", "k"), ("v_hr", "v")):
        for i in range(scale.shape[0]):
            want = (normed * scale[i]) @ np.asarray(layers["attn"][name]["kernel"][i])
            np.testing.assert_allclose(h @ np.asarray(grown[hr]["kernel"][i]), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="feature_rms"):
        add_hr_projections(plain, "copy-normed")


if os.name != "posix":  # the read-only-file-system cases use /proc
    pytestmark = pytest.mark.skip("POSIX only")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_rerunning_continues(world, tmp_path, sig):
    """SIGTERM (a scheduler) or Ctrl-C, with SIGINT inherited as ignored: the step in flight finishes, its checkpoint is
    saved, exit 143 / 130; re-running continues from it with each step logged once."""
    from tests.signals import with_signals

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "flexattn_jax.app.cli", "train", *base_args(world, out), "--steps", "400", "--save-every", "1000"]
    before = tree_hash(world / "data", world / "tiny.json")
    proc = subprocess.Popen(with_signals(cmd, "ignore"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [steps[-1]] and f"checkpoint of step {steps[-1]} saved" in err, err
    assert cli_main(["train", *base_args(world, out), "--steps", "400", "--stop-at", str(steps[-1] + 1)]) == 0
    again = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert again == [*steps, steps[-1] + 1]
    assert tree_hash(world / "data", world / "tiny.json") == before
