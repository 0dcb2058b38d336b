"""Properties of the shared Trainer, checked on the toy job in tests/train_toy_job.py."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import UsageError
from common.io import load_weights
from common.train import Trainer, add_training_args, scaled_learning_rate
from common.train.args import LR_SCHEDULERS

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
TOY_SCRIPT = REPO / "tests" / "train_toy_job.py"
_spec = importlib.util.spec_from_file_location("train_toy_job", TOY_SCRIPT)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def run_toy(output_dir: Path, *flags: str):
    return toy.main(["--output_dir", str(output_dir), "--report_to", "none", *flags])


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_weights(output_dir / "toy_weights.safetensors")


def test_training_flags_follow_diffusers_defaults_and_take_overrides():
    parser = argparse.ArgumentParser()
    add_training_args(parser, learning_rate=5e-6, train_batch_size=2)
    args = parser.parse_args([])
    assert (args.learning_rate, args.train_batch_size) == (5e-6, 2)
    assert (args.seed, args.checkpointing_steps, args.lr_scheduler, args.lr_warmup_steps) == (42, 250, "constant", 500)
    assert (args.adam_weight_decay, args.adam_epsilon, args.max_grad_norm, args.report_to) == (
        1e-2, 1e-8, 1.0, "tensorboard"
    )
    assert all(action.help for action in parser._actions)
    with pytest.raises(TypeError, match="learnin_rate"):
        add_training_args(argparse.ArgumentParser(), learnin_rate=1.0)

    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


def test_scale_lr_multiplies_by_accumulation_batch_and_processes(tmp_path):
    assert scaled_learning_rate(1e-5, 2, 4, 8) == pytest.approx(1e-5 * 64)
    trainer = Trainer(
        toy.build_parser().parse_args(
            ["--output_dir", str(tmp_path), "--scale_lr", "--gradient_accumulation_steps", "2", "--report_to", "none"]
        ),
        toy.ToyMethod(0.0, 0.0),
        toy.ToyDataset(10, 0.0),
    )
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 2 * 3 * 1)


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    parser = toy.build_parser()
    args = parser.parse_args(["--output_dir", str(tmp_path), "--report_to", "none", "--max_train_steps", "40"])
    dataset = toy.ToyDataset(args.num_samples, 0.0)
    trainer = Trainer(args, toy.ToyMethod(args.noise_std, args.dropout), dataset)
    fixed = {"x": dataset.x, "y": dataset.y}
    before = trainer.method.eval_loss(fixed)
    trainer.train()
    assert trainer.global_step == 40
    assert trainer.method.eval_loss(fixed) < 0.5 * before


@pytest.mark.parametrize(
    ("stop_at", "workers"), [(3, 0), (4, 0), (3, 2)], ids=["mid-epoch", "epoch-end", "mid-epoch-workers"]
)
def test_resume_continues_exactly(tmp_path, stop_at, workers):
    # 10 samples in batches of 3 -> 4 batches (the last of 1), 2 optimizer steps per epoch with accumulation 2:
    # stopping at step 3 resumes mid-epoch, at step 4 on an epoch boundary. Warmup spans the resume point, so
    # the scheduler state matters; validation (also right after the checkpoint at step 4) draws random
    # numbers, which must not shift training; data loader workers must not change augmentation.
    flags = [
        "--gradient_accumulation_steps", "2", "--checkpointing_steps", str(stop_at), "--validation_steps", "2",
        "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "5", "--dataloader_num_workers", str(workers),
    ]
    full = run_toy(tmp_path / "full", *flags, "--max_train_steps", "7")

    resumed_dir = tmp_path / "resumed"
    run_toy(resumed_dir, *flags, "--max_train_steps", str(stop_at))
    (resumed_dir / f"checkpoint-{stop_at + 100}.tmp").mkdir()  # a crash leftover: never picked as "latest"
    resumed = run_toy(resumed_dir, *flags, "--max_train_steps", "7", "--resume_from_checkpoint", "latest")

    assert [s for s, _ in resumed.history] == list(range(stop_at + 1, 8))
    assert resumed.history == full.history[stop_at:]  # bitwise equal losses
    a, b = final_weights(tmp_path / "full"), final_weights(resumed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(resumed_dir.glob("*.tmp"))
    assert json.loads((resumed_dir / "loss_history.json").read_text())[0][0] == stop_at + 1


def test_validation_does_not_change_training_and_saves_images(tmp_path):
    plain = run_toy(tmp_path / "plain", "--max_train_steps", "4")
    validated = run_toy(tmp_path / "validated", "--max_train_steps", "4", "--validation_steps", "1")
    assert plain.history == validated.history
    assert sorted(p.name for p in (tmp_path / "validated" / "validation").iterdir()) == [
        f"step-00000{i}_0.png" for i in range(1, 5)
    ]


def test_tensorboard_logs_are_written(tmp_path):
    toy.main(["--output_dir", str(tmp_path), "--max_train_steps", "2", "--validation_steps", "2"])
    assert list((tmp_path / "logs" / "toy").glob("events.out.tfevents.*"))


def test_checkpoints_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    run_toy(tmp_path, "--max_train_steps", "5", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4", "checkpoint-5"
    ]
    for checkpoint in ("checkpoint-4", "checkpoint-5"):
        files = {p.name for p in (tmp_path / checkpoint).iterdir()}
        assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= files
        assert "toy_weights.safetensors" in files


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path, capsys):
    trainer = run_toy(tmp_path, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert [s for s, _ in trainer.history] == [1, 2]
    assert "starting a new training run" in capsys.readouterr().out


def test_missing_checkpoint_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="checkpoint-7"):
        run_toy(tmp_path, "--max_train_steps", "2", "--resume_from_checkpoint", str(tmp_path / "checkpoint-7"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="bitsandbytes"):
        run_toy(tmp_path, "--max_train_steps", "1", "--use_8bit_adam")


def torchrun(output_dir: Path, *flags: str) -> list[list[float]]:
    """Run the toy job on 2 CPU processes (gloo) and return its loss history."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TOY_SCRIPT),
         "--output_dir", str(output_dir), "--report_to", "none", *flags],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((output_dir / "loss_history.json").read_text())


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # accelerate gives process r the batches r, r+2, ... of one seeded permutation, so with per-process batch 2
    # the global batch of each step is exactly the single-process batch of 4, and DDP averages the gradients
    # of the two halves. Augmentation is seeded per item, so it matches too; loss-side noise and dropout come
    # from per-process generators and are switched off for this comparison.
    common = ["--num_samples", "16", "--num_train_epochs", "2", "--noise_std", "0", "--dropout", "0",
              "--lr_scheduler", "linear"]
    ddp_history = torchrun(tmp_path / "ddp", "--train_batch_size", "2", *common)
    single = run_toy(tmp_path / "single", "--train_batch_size", "4", *common)

    assert [s for s, _ in ddp_history] == [s for s, _ in single.history] == list(range(1, 9))
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_process_resume_continues_exactly(tmp_path):
    # Every process restores its own random state (noise and dropout differ per process) and skips its own
    # shard of the epoch: 14 samples in per-process batches of 2 resume mid-epoch at step 3.
    flags = ["--num_samples", "14", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
             "--checkpointing_steps", "3", "--validation_steps", "2"]
    full = torchrun(tmp_path / "full", *flags, "--max_train_steps", "7")
    torchrun(tmp_path / "resumed", *flags, "--max_train_steps", "3")
    resumed = torchrun(tmp_path / "resumed", *flags, "--max_train_steps", "7", "--resume_from_checkpoint", "latest")
    assert resumed == full[3:]
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
