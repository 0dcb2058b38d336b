"""Trainer seams: on_step_start, step-aware items (workers, resume), logged loss parts."""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from accelerate.data_loader import BatchSamplerShard, SeedableRandomSampler
from torch.utils.data import BatchSampler, Dataset

import common.train.trainer as trainer_module
from common.cli import ArgumentParser
from common.train import Trainer, TrainingMethod, add_training_args
from common.train.steps import StepIndex, split_step_index, tag_batch_sampler

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SWITCH_STEP = 3  # a Seg-Mix-like switch: items consumed from this step on are "mixed"


class StepDataset(Dataset):
    """Items know the step that consumes them; the augmentation draws on the (item-seeded) global RNG."""

    wants_step = True

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: StepIndex) -> dict[str, torch.Tensor]:
        index, step = split_step_index(i)
        mixed = step >= SWITCH_STEP
        x = torch.full((2,), float(index)) + 0.01 * torch.randn(2) + (100.0 if mixed else 0.0)
        return {"index": torch.tensor(index), "step": torch.tensor(step), "x": x}


class RecordingMethod(TrainingMethod):
    """Records, per micro-batch, the step the Trainer is at and what the items say about themselves."""

    name = "seams"

    def __init__(self) -> None:
        self.step_starts: list[int] = []
        self.seen: list[tuple[int, list[int], list[int], list[float]]] = []

    def setup(self, accelerator) -> None:
        self.net = torch.nn.Linear(2, 1).to(accelerator.device)

    def modules(self):
        return {"net": self.net}

    def trainable_parameters(self):
        return self.net.parameters()

    def on_step_start(self, step: int) -> None:
        self.step_starts.append(step)

    def loss(self, batch, accelerator):
        current = self.step_starts[-1]
        self.seen.append((current, batch["index"].tolist(), batch["step"].tolist(), batch["x"][:, 1].tolist()))
        pred = self.net(batch["x"])
        mse = F.mse_loss(pred, torch.zeros_like(pred))
        return mse, {"mse_part": mse.detach(), "const": 2.0}

    def state_to_save(self):
        return dict(self.net.state_dict())


def run(output_dir, *flags: str) -> tuple[Trainer, RecordingMethod]:
    parser = ArgumentParser()
    add_training_args(parser, train_batch_size=3, learning_rate=1e-3, lr_warmup_steps=0, checkpointing_steps=0,
                      validation_steps=0, dataloader_num_workers=0, report_to="none")
    args = parser.parse_args(["--output_dir", str(output_dir), "--gradient_accumulation_steps", "2", *flags])
    method = RecordingMethod()
    trainer = Trainer(args, method, StepDataset())
    trainer.train()
    return trainer, method


def test_items_carry_the_step_that_consumes_them_with_workers_and_across_resume(tmp_path):
    # 10 items in batches of 3 -> 4 micro-batches, 2 optimizer steps per epoch (accumulation 2).
    _, full = run(tmp_path / "full", "--max_train_steps", "7")
    assert full.step_starts == list(range(7))
    for step, _, item_steps, x in full.seen:
        assert item_steps == [step] * len(item_steps)
        assert all((v > 50) == (step >= SWITCH_STEP) for v in x)  # the switch lands exactly at the step

    _, workers = run(tmp_path / "workers", "--max_train_steps", "7", "--dataloader_num_workers", "2")
    assert workers.seen == full.seen  # same items, same steps, same augmentation

    # Resume in the middle of epoch 1 (step 3), with workers: the continued run sees the same items.
    resumed_dir = tmp_path / "resumed"
    flags = ["--dataloader_num_workers", "2", "--checkpointing_steps", "3"]
    run(resumed_dir, *flags, "--max_train_steps", "3")
    _, resumed = run(resumed_dir, *flags, "--max_train_steps", "7", "--resume_from_checkpoint", "latest")
    assert resumed.step_starts == [3, 4, 5, 6]
    assert resumed.seen == [s for s in full.seen if s[0] >= 3]


def test_loss_parts_reach_the_progress_bar_and_the_trackers(tmp_path, monkeypatch):
    postfixes: list[dict] = []

    class RecordingTqdm(trainer_module.tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            postfixes.append(dict(ordered_dict or {}, **kwargs))
            return super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(trainer_module, "tqdm", RecordingTqdm)
    logged: list[tuple[dict, int]] = []
    monkeypatch.setattr("accelerate.Accelerator.log", lambda self, values, step=None, log_kwargs=None:
                        logged.append((dict(values), step)))
    trainer, method = run(tmp_path, "--max_train_steps", "2")

    assert [step for _, step in logged] == [1, 2]
    for (values, step), (_, loss) in zip(logged, trainer.history):
        assert set(values) == {"loss", "lr", "mse_part", "const"}
        assert values["const"] == 2.0
        # the part is averaged over the step's two micro-batches, like the loss (here they are equal)
        assert values["mse_part"] == pytest.approx(loss, rel=1e-6)
    assert postfixes[-1]["const"] == "2" and "mse_part" in postfixes[-1]


def test_two_process_shards_tag_every_batch_with_its_step_padding_included():
    # 11 items, per-process batch 2, 2 processes: global batches 0..5 (the last of 1 item); process r gets
    # batches r, r+2, r+4, and accelerate pads process 1's last batch with indices repeated from the epoch's
    # start: they must carry the step of their second use, not of their first.
    n, batch, procs, accumulation = 11, 2, 2, 2
    seeded = SeedableRandomSampler(range(n), data_seed=0)
    per_rank = []
    for rank in range(procs):
        shard = BatchSamplerShard(BatchSampler(seeded, batch, False), num_processes=procs, process_index=rank)
        local_batches = len(shard)
        steps_per_epoch = -(-local_batches // accumulation)
        tag_batch_sampler(shard, epoch_source=seeded, accumulation=accumulation, steps_per_epoch=steps_per_epoch)
        seeded.set_epoch(2)  # as the Trainer does before every epoch (iterating advances it)
        batches = list(shard)
        assert len(batches) == local_batches == 3
        for k, items in enumerate(batches):
            assert [i.step for i in items] == [2 * steps_per_epoch + k // accumulation] * batch
        seeded.set_epoch(2)
        plain = list(BatchSamplerShard(BatchSampler(seeded, batch, False), num_processes=procs, process_index=rank))
        assert [[int(i) for i in b] for b in batches] == plain  # same indices, same order
        per_rank.append(plain)
    assert set(per_rank[1][-1]) & set(per_rank[0][0])  # the padding really repeats an index of step 4


TWO_PROCESS_JOB = """
import json, sys
sys.path[:0] = [{tests!r}, {repo!r}]
from test_train_seams import RecordingMethod, StepDataset
from common.cli import ArgumentParser
from common.train import Trainer, add_training_args
parser = ArgumentParser()
add_training_args(parser, train_batch_size=2, learning_rate=1e-3, lr_warmup_steps=0, checkpointing_steps=0,
                  validation_steps=0, dataloader_num_workers=1, report_to="none")
args = parser.parse_args(["--output_dir", sys.argv[1], "--gradient_accumulation_steps", "2", "--max_train_steps", "5"])
method = RecordingMethod()
trainer = Trainer(args, method, StepDataset())
trainer.train()
with open(f"{{sys.argv[1]}}/seen-{{trainer.accelerator.process_index}}.json", "w") as f:
    json.dump([method.step_starts, method.seen], f)
"""


@pytest.mark.slow
def test_two_processes_with_workers_tag_items_with_the_consuming_step(tmp_path):
    # 10 items, 2 processes x batch 2 -> 3 batches per process and epoch, the last one padded by accelerate
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = tmp_path / "job.py"
    script.write_text(TWO_PROCESS_JOB.format(tests=str(tests), repo=str(tests.parent)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        step_starts, seen = json.loads((tmp_path / "out" / f"seen-{rank}.json").read_text())
        assert step_starts == [0, 1, 2, 3, 4] and len(seen) == 8  # 3 + 3 + 2 micro-batches
        for step, _, item_steps, _ in seen:
            assert item_steps == [step] * len(item_steps)


def test_step_index_is_an_int_that_survives_pickling():
    item = StepIndex(7, 3)
    assert item == 7 and [10, 11, 12, 13, 14, 15, 16, 17][item] == 17 and item + 1 == 8
    back = pickle.loads(pickle.dumps(item))
    assert type(back) is StepIndex and (back.index, back.step) == (7, 3)
    assert split_step_index(5) == (5, None) and split_step_index(item) == (7, 3)


# --- training conditioning (SDXL time ids, FLUX packing) -------------------------------------------------

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from diffusers.training_utils import (  # noqa: E402
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from common.models.tiny import build_tiny  # noqa: E402
from common.train import conditioning as cond  # noqa: E402
from common.train import flow  # noqa: E402


def test_sdxl_time_ids_equal_the_pipeline_and_fit_the_unet():
    pipe = build_tiny("tiny-sdxl")
    proj = pipe.text_encoder_2.config.projection_dim
    expected = pipe._get_add_time_ids((96, 80), (8, 4), (64, 64), torch.float16, text_encoder_projection_dim=proj)
    ours = cond.sdxl_add_time_ids((96, 80), (8, 4), (64, 64), batch=3, dtype=torch.float16)
    assert ours.dtype == torch.float16 and torch.equal(ours, expected.repeat(3, 1))

    # per-sample original sizes and crops, as a training batch records them
    sizes, crops = [(96, 80), (64, 128)], [(8, 4), (0, 32)]
    per_sample = torch.cat([pipe._get_add_time_ids(s, c, (64, 64), torch.float32, proj) for s, c in zip(sizes, crops)])
    assert torch.equal(cond.sdxl_add_time_ids(sizes, crops, (64, 64)), per_sample)
    with pytest.raises(ValueError, match="entries for a batch"):
        cond.sdxl_add_time_ids(sizes, [(0, 0)] * 3, (64, 64))
    # the same lists after a DataLoader's default_collate: [heights [B], widths [B]]
    from torch.utils.data import default_collate

    collated = default_collate([{"size": s, "crop": c} for s, c in zip(sizes, crops)])
    assert torch.equal(cond.sdxl_add_time_ids(collated["size"], collated["crop"], (64, 64)), per_sample)

    # the UNet accepts them: its added-embedding input width is 6 * time dim + pooled dim
    assert pipe.unet.add_embedding.linear_1.in_features == ours.shape[1] * pipe.unet.config.addition_time_embed_dim + proj


@pytest.mark.parametrize("latent_hw", [(8, 8), (8, 24), (6, 4)], ids=["tiny-flux", "wide-canvas", "non-square"])
def test_flux_packing_and_ids_equal_the_pipeline(latent_hw):
    h, w = latent_hw
    latents = torch.randn(2, 16, h, w)
    packed = cond.flux_pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, h, w))
    unpacked = cond.flux_unpack_latents(packed, latent_hw)
    assert torch.equal(unpacked, FluxPipeline._unpack_latents(packed, h * 8, w * 8, vae_scale_factor=8))
    assert torch.equal(unpacked, latents)
    ids = cond.flux_latent_image_ids(latent_hw, dtype=torch.bfloat16)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.bfloat16))
    with pytest.raises(ValueError, match="even"):
        cond.flux_pack_latents(torch.randn(1, 16, 5, 4))


def test_flux_conditioning_drives_the_transformer_like_the_pipeline():
    pipe = build_tiny("tiny-flux")
    transformer = pipe.transformer
    guidance = cond.flux_guidance(transformer, 3.5, 2)
    assert guidance.dtype == torch.float32 and torch.equal(guidance, torch.full([1], 3.5).expand(2))
    assert cond.flux_guidance(type("Cfg", (), {"guidance_embeds": False})(), 3.5, 2) is None
    channels = transformer.config.in_channels // 4  # packed 2x2 patches of the VAE's latent channels
    latents, text = torch.randn(2, channels, 8, 8), torch.randn(2, 5, transformer.config.joint_attention_dim)
    pooled, sigma = torch.randn(2, transformer.config.pooled_projection_dim), torch.tensor([0.3, 0.8])
    kwargs = dict(timestep=sigma, pooled_projections=pooled, encoder_hidden_states=text, return_dict=False)
    with torch.no_grad():
        ours = transformer(cond.flux_pack_latents(latents), guidance=guidance, txt_ids=cond.flux_text_ids(5),
                           img_ids=cond.flux_latent_image_ids((8, 8)), **kwargs)[0]
        theirs = transformer(FluxPipeline._pack_latents(latents, 2, channels, 8, 8), guidance=guidance,
                             txt_ids=torch.zeros(5, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu",
                                                                                                    torch.float32),
                             **kwargs)[0]
    assert torch.equal(ours, theirs)


# --- flow matching: densities, shifts, weighting, loss ---------------------------------------------------


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none", "sigma_sqrt"])
def test_timestep_densities_draw_what_diffusers_draws(scheme):
    kw = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ours = flow.sample_timestep_density(scheme, 64, generator=torch.Generator().manual_seed(5), **kw)
    theirs = compute_density_for_timestep_sampling(scheme, 64, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="logit_normal"):
        flow.sample_timestep_density("lognormal", 2)


def test_beta_density_is_beta_4_2_and_seeded():
    from scipy import stats

    u = flow.sample_timestep_density("beta", 20000, beta_a=4, beta_b=2, generator=torch.Generator().manual_seed(0))
    assert 0 < u.min() and u.max() < 1
    ks = stats.kstest(u.double().numpy(), stats.beta(4, 2).cdf)
    assert ks.statistic < 0.015  # Beta(4, 2): mean 2/3, mode 3/4
    assert abs(u.mean().item() - 2 / 3) < 0.005
    again = flow.sample_timestep_density("beta", 20000, beta_a=4, beta_b=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u, again)


def test_shifts_equal_the_flow_matching_scheduler():
    # static shift: the training tables of a scheduler with shift=3 are the shifted unshifted ones
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0)
    torch.testing.assert_close(flow.shift_sigmas(plain.sigmas, 3.0), static.sigmas, rtol=0, atol=1e-6)

    # resolution shift: FLUX's mu = calculate_shift(L) and the scheduler's exponential time shift
    dynamic = build_tiny("tiny-flux").scheduler
    u = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for seq_len in (16, 256, 1024, 3 * 1024, 4096):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        assert math.log(flow.resolution_shift(seq_len)) == pytest.approx(mu, abs=1e-12)
        assert flow.scheduler_resolution_shift(dynamic, seq_len) == flow.resolution_shift(seq_len)
        torch.testing.assert_close(flow.shift_sigmas(u, flow.resolution_shift(seq_len)),
                                   dynamic.time_shift(mu, 1.0, u), rtol=0, atol=1e-12)


def test_scheduler_sigmas_follow_the_diffusers_examples():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = flow.sample_timestep_density("logit_normal", 16, generator=torch.Generator().manual_seed(1))
    sigmas, timesteps = flow.scheduler_sigmas(u, scheduler)
    indices = (u * 1000).long()
    expected_t = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in expected_t]  # the examples' get_sigmas
    assert torch.equal(timesteps, expected_t) and torch.equal(sigmas, scheduler.sigmas[step_indices])


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "none", "logit_normal"])
def test_loss_weighting_and_loss_equal_the_sd3_examples(scheme):
    g = torch.Generator().manual_seed(2)
    sigmas = torch.rand(4, generator=g).clamp_min(0.05)
    weighting = flow.loss_weighting(scheme, sigmas)
    torch.testing.assert_close(weighting, compute_loss_weighting_for_sd3(scheme, sigmas), rtol=0, atol=0)

    pred, target = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    w = weighting.view(-1, 1, 1, 1)
    expected = torch.mean((w.float() * (pred.float() - target.float()) ** 2).reshape(4, -1), 1).mean()
    torch.testing.assert_close(flow.flow_matching_loss(pred, target, weighting), expected, rtol=1e-6, atol=0)


def test_flow_interpolation_and_target_token_loss():
    g = torch.Generator().manual_seed(3)
    x0, noise, sigmas = torch.randn(2, 4, 4, 8, generator=g), torch.randn(2, 4, 4, 8, generator=g), torch.tensor([0.0, 1.0])
    x_t, v = flow.flow_interpolate(x0, noise, sigmas)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1]) and torch.equal(v, noise - x0)

    # SynCD: a packed canvas of a target and two references; the loss counts the target tokens only
    pred, target = torch.randn(2, 12, 64, generator=g), torch.randn(2, 12, 64, generator=g)
    keep = (torch.arange(12) % 6) < 2  # token grid 2 x 6: the target is columns 0-1 of each row
    expected = ((pred[:, keep] - target[:, keep]) ** 2).mean()
    torch.testing.assert_close(flow.flow_matching_loss(pred, target, token_mask=keep), expected, rtol=1e-6, atol=0)
    # changing the reference tokens' predictions changes nothing
    pred2 = pred.clone()
    pred2[:, ~keep] += 5
    assert flow.flow_matching_loss(pred2, target, token_mask=keep) == flow.flow_matching_loss(pred, target,
                                                                                                   token_mask=keep)
