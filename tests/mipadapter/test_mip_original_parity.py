"""Parity with the original MIP-Adapter code (github.com/hqhQAQ/MIP-Adapter), re-implemented here from its
formulas on tiny-sdxl: the whole sampling call (IPAdapterXL.generate + attention_processor_multi.IPAttnProcessor
on diffusers' StableDiffusionXLPipeline), the training noising (DDPMScheduler from the model's scheduler
config), and the Concept101 evaluation inputs (reference preprocessing, entity lengths, CLIP-T text)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from common.cli import parse_args
from common.models.image_encoders import load_image_encoder
from common.models.tiny import build_tiny
from mipadapter import eval as mip_eval
from mipadapter import sample as mip_sample
from mipadapter.model import VARIANTS, MIPAdapter, random_mip_state
from mipadapter.pipeline import NEGATIVE_PROMPT, entity_lengths, generate
from mipadapter.processor import MIPAdapterAttnProcessor


class OriginalIPAttnProcessor(torch.nn.Module):
    """attention_processor_multi.IPAttnProcessor.__call__, step by step (baddbmm attention, per-object loops,
    all 77 word rows, no epsilon), with the weights of one of our processors."""

    def __init__(self, ours: MIPAdapterAttnProcessor, num_tokens: int, num_objects: int, scale: float):
        super().__init__()
        self.to_k_ip, self.to_v_ip, self.text_to_weight = ours.to_k_ip[0], ours.to_v_ip[0], ours.text_to_weight
        self.num_tokens, self.num_objects, self.scale = num_tokens, num_objects, scale
        self.entity_text_embeds = None
        self.tokenizer_entity_indexes = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        end_pos = encoder_hidden_states.shape[1] - self.num_objects * self.num_tokens
        text, ip = encoder_hidden_states[:, :end_pos], encoder_hidden_states[:, end_pos:]
        query = attn.head_to_batch_dim(query)
        key, value = attn.head_to_batch_dim(attn.to_k(text)), attn.head_to_batch_dim(attn.to_v(text))
        hs = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, key, None), value))
        ip = ip.reshape(batch_size, self.num_objects, self.num_tokens, -1)
        outs, maps = [], []
        for k in range(self.num_objects):
            ik = attn.head_to_batch_dim(self.to_k_ip(ip[:, k]))
            iv = attn.head_to_batch_dim(self.to_v_ip(ip[:, k]))
            outs.append(self.scale * attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, ik, None), iv)))
            ek = attn.head_to_batch_dim(attn.to_k(self.entity_text_embeds[:, k]))
            word = attn.get_attention_scores(ek, query, None)  # softmax over the latent positions
            maps.append(word.reshape(batch_size, attn.heads, -1, word.shape[-1]).detach())
        outs = torch.stack(outs, 1)
        maps = torch.stack(maps, 1).mean(2)
        sel = torch.stack([maps[b, k, 1:1 + self.tokenizer_entity_indexes[b][k][1]].mean(0)
                           for b in range(batch_size) for k in range(self.num_objects)])
        sel = sel.reshape(batch_size, self.num_objects, -1)
        sel = sel / sel.sum(dim=1, keepdim=True)
        gate = torch.sigmoid(self.text_to_weight(hs))
        gate = (gate / gate.mean(dim=1, keepdim=True)).unsqueeze(1)
        hs = hs + (sel.unsqueeze(-1) * gate * outs).sum(1)
        out = attn.to_out[1](attn.to_out[0](hs))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def picture(seed: int, size: int = 40) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def euler_pipe():
    pipe = build_tiny("tiny-sdxl")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # SDXL base's sampler
    return pipe


def original_generate(pipe, adapter, encoder, prompts, images, words, *, scale, steps, seed, size, num_samples=1,
                      token_lengths=None):
    """IPAdapterXL.generate (its own negative prompt, guidance left to the pipeline's default) for `prompts`, each
    with the same references `images` (per object) and entity `words`."""
    base = copy.deepcopy(pipe.unet)
    k, t, n_p, s = len(words), adapter.num_tokens, len(prompts), num_samples
    procs = {}
    for name, proc in pipe.unet.attn_processors.items():
        procs[name] = (OriginalIPAttnProcessor(proc, t, k, scale) if isinstance(proc, MIPAdapterAttnProcessor)
                       else AttnProcessor2_0())
    base.set_attn_processor(procs)
    orig = StableDiffusionXLPipeline(**{**pipe.components, "unet": base})
    orig.set_progress_bar_config(disable=True)
    groups = [g for _ in prompts for g in images]
    with torch.no_grad():
        feats = encoder.encode([im for group in groups for im in group], "pooled")
        tokens = adapter.image_proj(feats)
        dim = tokens.shape[-1]
        tokens = torch.stack([x.mean(0) for x in torch.split(tokens, [len(g) for g in groups])])
        tokens = tokens.reshape(n_p, -1, dim)
        uncond = adapter.image_proj(torch.zeros(n_p * k, feats.shape[-1])).reshape(n_p, -1, dim)
        tokens = tokens.repeat(1, s, 1).view(n_p * s, -1, dim)
        uncond = uncond.repeat(1, s, 1).view(n_p * s, -1, dim)
        pe, ne, pp, npp = orig.encode_prompt(list(prompts), num_images_per_prompt=s, do_classifier_free_guidance=True,
                                             negative_prompt=[NEGATIVE_PROMPT] * n_p)
        names = [w for _ in prompts for w in words]
        ee, nee, _, _ = orig.encode_prompt(names, num_images_per_prompt=s, do_classifier_free_guidance=True,
                                           negative_prompt=[""] * len(names))
        ee = ee.reshape(n_p, k, s, 77, -1).permute(0, 2, 1, 3, 4).reshape(n_p * s, k, 77, -1)
        entity = torch.cat([nee.reshape(n_p * s, k, 77, -1), ee])
    per_prompt = [[(-1, n) for n in row] for row in token_lengths] if token_lengths else \
        [[(-1, len(pipe.tokenizer(w).input_ids) - 2) for w in words] for _ in prompts]
    lengths = [e for item in per_prompt for e in [item] * s]
    for p in base.attn_processors.values():
        if isinstance(p, OriginalIPAttnProcessor):
            p.entity_text_embeds, p.tokenizer_entity_indexes = entity, lengths + lengths
    with torch.no_grad():
        return orig(prompt_embeds=torch.cat([pe, tokens], 1), negative_prompt_embeds=torch.cat([ne, uncond], 1),
                    pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npp, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(seed), height=size, width=size, output_type="np").images


@pytest.mark.parametrize("prompts, num_samples, lengths", [
    (["a teddy bear next to a dog"], 1, None),
    (["a teddy bear next to a dog", "a dog at dawn"], 2, [[2, 1], [1, 1]]),  # eval's fallback length 1
])
def test_generate_defaults_equal_the_original_generate_call(euler_pipe, prompts, num_samples, lengths):
    """Our generate() with its defaults (CFG 5.0, the negative prompt, seed 420) against the original's generate
    on the same tiny weights: same images up to float rounding (with CFG 7.5 they differ by far more)."""
    pipe = euler_pipe
    unet_copy = copy.deepcopy(pipe.unet)
    adapter = MIPAdapter(unet_copy, random_mip_state(unet_copy, "sdxl", seed=11))
    work = StableDiffusionXLPipeline(**{**pipe.components, "unet": unet_copy})
    work.set_progress_bar_config(disable=True)
    encoder = load_image_encoder(VARIANTS["sdxl"].tiny_image_encoder)
    images, words = [[picture(1)], [picture(2), picture(3)]], ["teddy bear", "dog"]
    ours, _ = generate(work, adapter, encoder, prompts, images, words, scale=0.75, num_inference_steps=3,
                       num_samples=num_samples, height=32, width=32, progress=False,
                       lengths=None if lengths is None else torch.tensor(lengths))
    theirs = original_generate(work, adapter, encoder, prompts, images, words, scale=0.75, steps=3, seed=420,
                               size=32, num_samples=num_samples, token_lengths=lengths)
    assert len(ours) == len(theirs) == len(prompts) * num_samples
    for a, b in zip(ours, theirs):
        assert np.abs(np.asarray(a, dtype=np.float32) - np.round(b * 255)).max() <= 1.0  # uint8 rounding
    assert mip_sample.build_parser().get_default("guidance_scale") == 5.0
    assert mip_eval_default("guidance_scale") == 5.0


def mip_eval_default(name):
    from common.cli import ArgumentParser

    p = ArgumentParser(prog="x")
    mip_eval.add_generate_args(p)
    return p.get_default(name)


def test_training_noises_with_ddpm_betas_not_the_pipelines_sampler(tmp_path, fresh_accelerate_state, monkeypatch):
    """train_sdxl.py: DDPMScheduler.from_pretrained(subfolder="scheduler").add_noise, whatever the sampler is."""
    from accelerate import Accelerator

    import mipadapter.train as train_mod
    from mipadapter.data import SubjectDataset, collate, write_synthetic_sample

    real_load = train_mod.load_pipeline

    def load_with_euler(name, *a, **kw):
        pipe = real_load(name, *a, **kw)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        return pipe

    monkeypatch.setattr(train_mod, "load_pipeline", load_with_euler)
    data = tmp_path / "data"
    write_synthetic_sample(data, "s0", seed=0)
    args = parse_args(train_mod.build_parser(), [
        "--variant", "sdxl", "--pretrained_model_name_or_path", "tiny-sdxl", "--image_encoder_path",
        "tiny-clip-vision-g", "--data_root", str(data), "--resolution", "64", "--report_to", "none",
        "--output_dir", str(tmp_path / "out")])
    method = train_mod.MIPTraining(args)
    acc = Accelerator(cpu=True)
    method.setup(acc)
    batch = collate([SubjectDataset(data, resolution=64)[0]])
    method.loss(batch, acc)
    seen = method.last_inputs
    cfg = method.pipe.scheduler.config
    betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps) ** 2
    ab = torch.cumprod(1 - betas, 0)[seen["timesteps"]].view(-1, 1, 1, 1)
    expected = ab.sqrt() * seen["latents"] + (1 - ab).sqrt() * seen["noise"]
    torch.testing.assert_close(seen["noisy_latents"], expected, atol=1e-5, rtol=1e-5)


def original_reference(path, json_path):
    """data/concept101_dataset.py: Resize(800) -> crop(int32 box) -> resize_padding_image(224)."""
    from torchvision import transforms

    img = transforms.Resize(800)(Image.open(path))
    box = np.array(json.loads(json_path.read_text())["mask"][1]["box"]).astype(np.int32)
    img = img.crop((box[0], box[1], box[2], box[3]))
    aspect = img.width / img.height
    if aspect > 1.0:
        w, h = 224, int(224 / aspect)
    else:
        h, w = 224, int(224 * aspect)
    left, top = (224 - w) // 2, (224 - h) // 2
    return transforms.Compose([transforms.Resize((h, w)),
                               transforms.Pad((left, top, 224 - w - left, 224 - h - top), fill=255)])(img)


@pytest.mark.parametrize("size,box", [((300, 451), [10.7, 20.9, 613.6, 799.2]),
                                      ((517, 260), [100.2, 3.9, 700.8, 420.5])])
def test_concept101_reference_preprocessing_is_the_originals(tmp_path, size, box):
    concept = tmp_path / "benchmark_dataset" / "cat"
    concept.mkdir(parents=True)
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(concept / "a.jpg")
    (tmp_path / "json_data" / "cat").mkdir(parents=True)
    (tmp_path / "json_data" / "cat" / "a.json").write_text(json.dumps({"mask": [{}, {"box": box}]}))
    ours = mip_eval.reference_image(concept / "a.jpg", tmp_path / "json_data")
    theirs = original_reference(concept / "a.jpg", tmp_path / "json_data" / "cat" / "a.json")
    assert ours.size == theirs.size == (224, 224)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert("RGB")))


def test_concept101_entity_lengths_and_clip_t_text(euler_pipe):
    pipe = euler_pipe
    words = ["teddy bear", "dog"]
    full = entity_lengths(pipe, words).tolist()
    assert full[0] == 2
    assert mip_eval.entity_token_lengths(pipe, "a teddy bear and a dog.", words) == full
    assert mip_eval.entity_token_lengths(pipe, "a dog at dawn.", words) == [1, full[1]]  # absent: (1, 1)
    assert mip_eval.clip_t_text("photo of the cat and chair.") == "photo of the cat and chair."
    assert mip_eval.clip_t_text("the cat playing with a wooden pot") == "the cat playing with a wooden pot_gen."
    assert mip_eval.clip_t_text("a cat. a dog.") == "a cat."


def test_layer_with_cross_attention_norm_matches_the_original_processor():
    """norm_cross layers: the original normalises the entity embeds with the layer's norm before its word maps."""
    from diffusers.models.attention_processor import Attention

    from mipadapter.processor import MIPState

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=24, heads=4, dim_head=8, cross_attention_norm="layer_norm").eval()
    with torch.no_grad():
        attn.norm_cross.weight.normal_()
        attn.norm_cross.bias.normal_()
    ours = MIPAdapterAttnProcessor(32, 24, 4)
    with torch.no_grad():
        ours.text_to_weight.weight.normal_()
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 16, 32, generator=g), torch.randn(2, 7, 24, generator=g)
    tokens, ent = torch.randn(2, 2, 4, 24, generator=g), torch.randn(2, 2, 77, 24, generator=g) * 3
    lens = torch.tensor([[1, 2], [3, 1]])
    theirs = OriginalIPAttnProcessor(ours, 4, 2, 0.7)
    theirs.entity_text_embeds, theirs.tokenizer_entity_indexes = ent, [[(-1, 1), (-1, 2)], [(-1, 3), (-1, 1)]]
    with torch.no_grad():
        attn.set_processor(ours)
        a = attn(x, encoder_hidden_states=text, mip=MIPState(tokens, ent, lens, scale=0.7))
        # the original normalises text and entity embeds inside; its image tokens bypass the norm
        ref = OriginalNormCross(theirs)(attn, x, torch.cat([text, tokens.flatten(1, 2)], 1))
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


class OriginalNormCross:
    """The original's norm_cross branch: split text / image tokens, then norm the text and the entity embeds."""

    def __init__(self, proc: OriginalIPAttnProcessor):
        self.proc = proc

    def __call__(self, attn, x, context):
        end = context.shape[1] - self.proc.num_objects * self.proc.num_tokens
        text = attn.norm_encoder_hidden_states(context[:, :end])
        b, k = self.proc.entity_text_embeds.shape[:2]
        saved = self.proc.entity_text_embeds
        self.proc.entity_text_embeds = attn.norm_encoder_hidden_states(saved.flatten(0, 1)).view(saved.shape)
        try:
            return self.proc(attn, x, torch.cat([text, context[:, end:]], 1))
        finally:
            self.proc.entity_text_embeds = saved


def test_random_init_copies_each_layers_to_k_to_v(tmp_path, fresh_accelerate_state):
    """train_sdxl.py without --pretrained_ip_adapter_path: to_k_ip / to_v_ip = the layer's to_k / to_v."""
    from accelerate import Accelerator

    import mipadapter.train as train_mod
    from mipadapter.data import write_synthetic_sample

    write_synthetic_sample(tmp_path / "data", "s0")
    args = parse_args(train_mod.build_parser(), [
        "--variant", "sdxl", "--pretrained_model_name_or_path", "tiny-sdxl", "--image_encoder_path",
        "tiny-clip-vision-g", "--data_root", str(tmp_path / "data"), "--report_to", "none",
        "--output_dir", str(tmp_path / "out")])
    method = train_mod.MIPTraining(args)
    method.setup(Accelerator(cpu=True))
    layers = [m for n, m in method.unet.named_modules() if n.endswith("attn2")]
    assert len(layers) == 8
    for attn in layers:
        assert torch.equal(attn.processor.to_k_ip[0].weight, attn.to_k.weight)
        assert torch.equal(attn.processor.to_v_ip[0].weight, attn.to_v.weight)


def test_original_flags_take_the_file_name_up_to_its_first_dot_as_the_word(tmp_path):
    """inference.py: entity name = path.split('/')[-1].split('.')[0]."""
    from mipadapter.references import from_flags

    refs = from_flags([], [str(tmp_path / "cat.v2.jpg"), str(tmp_path / "dog.png")])
    assert [r.word for r in refs] == ["cat", "dog"]


def original_image_proj(sd, x, variant):
    """ip_adapter_multi.ImageProjModel / resampler.Resampler (SDXL plus: dim_head 64) from the checkpoint keys."""
    if variant == "sdxl":
        d = sd["norm.weight"].shape[0]
        out = F.linear(x, sd["proj.weight"], sd["proj.bias"]).reshape(-1, sd["proj.weight"].shape[0] // d, d)
        return F.layer_norm(out, (d,), sd["norm.weight"], sd["norm.bias"])
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])
    latents = sd["latents"].repeat(x.shape[0], 1, 1)
    x = F.linear(x, sd["proj_in.weight"], sd["proj_in.bias"])
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}.0"
        xs, lat = ln(x, p + ".norm1"), ln(latents, p + ".norm2")
        heads = sd[p + ".to_q.weight"].shape[0] // 64
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
        q = split(F.linear(lat, sd[p + ".to_q.weight"]))
        k, v = F.linear(torch.cat([xs, lat], -2), sd[p + ".to_kv.weight"]).chunk(2, dim=-1)
        k, v = split(k), split(v)
        s = 1 / (64 ** 0.25)
        w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1)
        out = (w @ v).permute(0, 2, 1, 3).reshape(lat.shape[0], lat.shape[1], -1)
        latents = F.linear(out, sd[p + ".to_out.weight"]) + latents
        f = f"layers.{i}.1"
        h = F.gelu(F.linear(ln(latents, f + ".0"), sd[f + ".1.weight"]))
        latents = F.linear(h, sd[f + ".3.weight"]) + latents
    return ln(F.linear(latents, sd["proj_out.weight"], sd["proj_out.bias"]), "norm_out")


@pytest.mark.parametrize("variant", ["sdxl", "sdxl_plus"])
def test_image_projection_equals_the_originals(euler_pipe, variant):
    unet = copy.deepcopy(euler_pipe.unet)
    state = random_mip_state(unet, variant, seed=4)
    adapter = MIPAdapter(unet, state)
    feats = load_image_encoder(VARIANTS[variant].tiny_image_encoder).encode([picture(5), picture(6)],
                                                                            VARIANTS[variant].feature)
    with torch.no_grad():
        torch.testing.assert_close(adapter.image_proj(feats), original_image_proj(state["image_proj"], feats, variant),
                                   atol=1e-5, rtol=1e-5)
