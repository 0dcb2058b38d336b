"""Bad training input (issue 14 §5): each exact command gives one `error: ...` line and exit code 2, and the
earlier run's files stay byte-identical. Runs the toy job (tests/train_toy_job.py) through `cli.run`."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import run
from common.data import ImageFolderDataset
from common.errors import UsageError
from common.io import load_weights, save_weights
from common.train import Trainer, TrainingMethod

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
TOY_SCRIPT = REPO / "tests" / "train_toy_job.py"
_spec = importlib.util.spec_from_file_location("train_toy_job", TOY_SCRIPT)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)
BASE = ["--report_to", "none", "--max_train_steps", "2", "--checkpointing_steps", "2"]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_exit_2(capsys, argv: list[str]) -> str:
    """Run the toy job's main through cli.run; assert exit 2 and a single `error:` line; return that line."""
    _reset_accelerate()
    capsys.readouterr()  # drop what earlier runs printed
    with pytest.raises(SystemExit) as exit_info:
        run(toy.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed 2-step toy run with checkpoint-2 and final weights: the earlier result to protect."""
    out = tmp_path_factory.mktemp("toy") / "run"
    _reset_accelerate()
    toy.main(["--output_dir", str(out), *BASE])
    assert (out / "checkpoint-2").is_dir() and (out / "toy_weights.safetensors").is_file()
    assert not (out / ".train.lock").exists()  # released at the end
    return out


@pytest.mark.parametrize("flags, needle", [
    (["--train_batch_size", "0"], "--train_batch_size: must be a positive integer (>= 1), got 0"),
    (["--max_train_steps", "0"], "--max_train_steps: must be a positive integer (>= 1), got 0"),
    (["--max_train_steps", "-5"], "--max_train_steps: must be a positive integer (>= 1), got -5"),
    (["--num_train_epochs", "0"], "--num_train_epochs: must be a positive integer"),
    (["--gradient_accumulation_steps", "-1"], "--gradient_accumulation_steps: must be a positive integer"),
    (["--checkpointing_steps", "-1"], "--checkpointing_steps: must be 0 or more"),
    ([], "already holds an earlier run's results (checkpoint-2"),
    (["--resume_from_checkpoint", "latest", "--max_train_steps", "1"], "at step 2, beyond --max_train_steps 1"),
])
def test_bad_run_in_a_used_output_dir_is_one_line_and_touches_nothing(finished_run, capsys, flags, needle):
    before = snapshot(finished_run)
    line = one_line_exit_2(capsys, ["--output_dir", str(finished_run), *BASE, *flags])
    assert needle in line
    if not flags:  # the refusal says how to continue or start over
        assert "--resume_from_checkpoint latest" in line and "--overwrite_output_dir" in line
    assert snapshot(finished_run) == before


def test_counts_below_one_are_refused_in_code_too(tmp_path):
    args = toy.build_parser().parse_args(["--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    args.max_train_steps = 0  # 0 used to mean "a whole epoch"
    with pytest.raises(UsageError, match="--max_train_steps must be at least 1, got 0"):
        Trainer(args, toy.ToyMethod(0.0, 0.0), toy.ToyDataset(4, 0.0))
    assert not (tmp_path / "o").exists()


def test_resume_latest_into_a_dir_with_weights_but_no_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _reset_accelerate()
    toy.main(["--output_dir", str(out), "--report_to", "none", "--max_train_steps", "1"])
    before = snapshot(out)
    line = one_line_exit_2(capsys, ["--output_dir", str(out), "--report_to", "none", "--max_train_steps", "2",
                                    "--resume_from_checkpoint", "latest"])
    assert "has no checkpoint to resume from" in line and snapshot(out) == before


def test_overwrite_output_dir_starts_over_and_drops_old_checkpoints(tmp_path):
    out = tmp_path / "run"
    _reset_accelerate()
    toy.main(["--output_dir", str(out), *BASE])
    (out / "checkpoint-7").mkdir()  # an earlier, longer run's checkpoint must not survive as "latest"
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-7", dirs_exist_ok=True)
    _reset_accelerate()
    fresh = toy.main(["--output_dir", str(out), *BASE, "--checkpointing_steps", "0", "--overwrite_output_dir"])
    assert [s for s, _ in fresh.history] == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == []


def test_resume_continues_from_a_used_dir(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _reset_accelerate()
    resumed = toy.main(["--output_dir", str(out), *BASE, "--max_train_steps", "3", "--resume_from_checkpoint",
                        "latest"])
    assert [s for s, _ in resumed.history] == [3]


# ------------------------------------------------------------------------------------------------------- lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_running_run_locks_its_output_dir(tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".train.lock").write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        line = one_line_exit_2(capsys, ["--output_dir", str(out), *BASE])
        assert f"in use by another training run (pid/host {sleeper.pid}" in line
        assert sorted(p.name for p in out.iterdir()) == [".train.lock"]  # nothing written beside it
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / ".train.lock").write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    _reset_accelerate()
    trainer = toy.main(["--output_dir", str(out), *BASE])
    assert trainer.global_step == 2 and not (out / ".train.lock").exists()


_RACE = """
import sys, time
from common.errors import UsageError
from common.train.checkpoints import OutputDirLock
judge = OutputDirLock._stale
def slow_judge(self):  # widen the window between "it is stale" and taking it over
    verdict = judge(self)
    time.sleep(0.3)
    return verdict
OutputDirLock._stale = slow_judge
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    OutputDirLock(sys.argv[1]).acquire()
except UsageError:
    print("refused")
else:
    print("held")
    time.sleep(4)  # keep it while the others try (each judgement takes 0.3 s, one at a time)
"""


def test_only_one_of_several_runs_takes_over_a_stale_lock(tmp_path):
    """Four processes find the same dead run's lock at once: exactly one may take it over (without the folder
    guard two could both judge it stale, or read a lock another has created but not yet written)."""
    import socket
    import time

    out = tmp_path / "run"
    out.mkdir()
    (out / ".train.lock").write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(out), str(start)], stdout=subprocess.PIPE,
                              text=True, cwd=str(Path(__file__).resolve().parents[1])) for _ in range(4)]
    answers = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert answers == ["held"] + ["refused"] * 3


def test_lock_is_held_during_training(tmp_path):
    seen = []

    class Spy(toy.ToyMethod):
        def loss(self, batch, accelerator):
            seen.append((tmp_path / "run" / ".train.lock").read_text().split()[0])
            return super().loss(batch, accelerator)

    args = toy.build_parser().parse_args(["--output_dir", str(tmp_path / "run"), *BASE])
    Trainer(args, Spy(0.0, 0.0), toy.ToyDataset(6, 0.0)).train()
    assert seen and set(seen) == {str(os.getpid())}
    assert not (tmp_path / "run" / ".train.lock").exists()


# -------------------------------------------------------------------------------------- broken checkpoints


class Payload:
    """Unpickling this would create a marker file: proof that a pickled payload ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _break_missing_optimizer(ckpt: Path, tmp: Path) -> None:
    (ckpt / "optimizer.bin").unlink()


def _break_pickle_payload(ckpt: Path, tmp: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "evil": Payload(str(tmp / "PAYLOAD_RAN"))}, ckpt / "optimizer.bin")


def _break_pickle_in_rng(ckpt: Path, tmp: Path) -> None:
    torch.save({"evil": Payload(str(tmp / "PAYLOAD_RAN"))}, ckpt / "random_states_0.pkl")


def _break_garbage_model(ckpt: Path, tmp: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 100)


def _break_other_model(ckpt: Path, tmp: Path) -> None:
    weights = load_weights(ckpt / "model.safetensors")
    weights["0.weight"] = torch.zeros(64, toy.IN_DIM)  # a wider first layer: another model
    save_weights(weights, ckpt / "model.safetensors")


def _break_other_tokens(ckpt: Path, tmp: Path) -> None:
    weights = load_weights(ckpt / "model.safetensors")
    weights["3.bias"] = torch.zeros(3)  # as when a concept was trained with another number of new tokens
    save_weights(weights, ckpt / "model.safetensors")


@pytest.mark.parametrize("breaker, needle", [
    (_break_missing_optimizer, "lacks optimizer.bin"),
    (_break_pickle_payload, "holds pickled Python objects"),
    (_break_pickle_in_rng, "random_states_0.pkl holds pickled Python objects"),
    (_break_garbage_model, "is corrupt or not a weights file"),
    (_break_other_model, "does not fit this run's model (0.weight (64, 4) vs (32, 4)"),
    (_break_other_tokens, "does not fit this run's model (3.bias (3,) vs (1,)"),
])
def test_resume_from_a_broken_checkpoint_is_one_line(finished_run, tmp_path, capsys, breaker, needle):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    breaker(out / "checkpoint-2", tmp_path)
    before = snapshot(out)
    line = one_line_exit_2(capsys, ["--output_dir", str(out), *BASE, "--max_train_steps", "3",
                                    "--resume_from_checkpoint", "latest"])
    assert needle in line, line
    assert not (tmp_path / "PAYLOAD_RAN").exists()
    assert snapshot(out) == before


# -------------------------------------------------------------------------------------------- bad images


class _NeverLoads(TrainingMethod):
    """Fails the test if the Trainer gets as far as loading a model."""

    def setup(self, accelerator):
        raise AssertionError("the model was loaded before the data was checked")

    def modules(self):
        return {}

    def trainable_parameters(self):
        return []

    def loss(self, batch, accelerator):
        raise AssertionError

    def state_to_save(self):
        return {}


def _image_folder(tmp_path: Path, bad_name: str, bad_bytes: bytes | None = None, bad_size: int = 0) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(folder / f"{i}.png")
    if bad_bytes is not None:
        (folder / bad_name).write_bytes(bad_bytes)
    else:
        Image.new("RGB", (bad_size, bad_size), (9, 9, 9)).save(folder / bad_name)
    return folder


@pytest.mark.parametrize("bad_bytes, bad_size, needle", [
    (b"\x89PNG\r\n\x1a\n broken", 0, "cannot read image"),
    (None, 1, "is only 1x1 pixels (at least 8 on each side needed)"),
    (None, 7, "is only 7x7 pixels"),
])
def test_bad_training_image_is_found_before_the_model_loads(tmp_path, bad_bytes, bad_size, needle):
    folder = _image_folder(tmp_path, "zz_bad.png", bad_bytes, bad_size)
    args = toy.build_parser().parse_args(["--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    with pytest.raises(UsageError, match="zz_bad.png") as err:
        Trainer(args, _NeverLoads(), ImageFolderDataset(folder, 8, prompt="a"))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_error_during_training_starts_on_its_own_line_after_the_progress_bar(tmp_path, capsys):
    class FailsAtStep2(toy.ToyMethod):
        def loss(self, batch, accelerator):
            if self.calls == 1:
                raise UsageError("image 3.png went away")
            self.calls += 1
            return super().loss(batch, accelerator)

    def main(argv=None):
        args = toy.build_parser().parse_args(argv)
        method = FailsAtStep2(0.0, 0.0)
        method.calls = 0
        Trainer(args, method, toy.ToyDataset(10, 0.0)).train()

    with pytest.raises(SystemExit):
        run(main, ["--output_dir", str(tmp_path / "run"), "--report_to", "none", "--max_train_steps", "5"])
    err = capsys.readouterr().err
    assert "Steps" in err  # the bar was drawn
    assert "\nerror: image 3.png went away\n" in err and err.endswith("went away\n")
    assert not (tmp_path / "run" / ".train.lock").exists()


def test_script_prints_one_line_for_a_used_output_dir(finished_run, tmp_path):
    """The real command line, in a fresh process: one line on stderr, exit 2, nothing touched."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(TOY_SCRIPT), "--output_dir", str(out), *BASE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --output_dir"), proc.stderr
    assert snapshot(out) == before


@pytest.mark.slow
def test_two_processes_stop_together_on_a_refused_output_dir(finished_run, tmp_path):
    """The main process decides and tells the other: neither waits forever at a barrier."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TOY_SCRIPT),
         "--output_dir", str(out), *BASE],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("error: --output_dir") == 2, proc.stderr[-2000:]  # one line from each process
    assert "Traceback" not in proc.stderr.split("error: --output_dir")[0]
    assert snapshot(out) == before
