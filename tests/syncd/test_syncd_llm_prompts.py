"""SynCD `--llm` prompt path (the original's gen_prompts.py): reply cleaning, the prompt-file structure, request
counts, de-duplication, resumability, the rigid caption rules, and the real loading/generation path through a
tiny random-weight LLaMA saved to a folder (assertions on structure, never on what a random model writes);
a missing model folder is one line."""
from __future__ import annotations

import json
import random
from argparse import Namespace

import pytest
import torch

from common.cli import run
from syncd.llm_prompts import (BG_DEFORMABLE, BG_RIGID, DESC_DEFORMABLE, SYSTEM, clean_prompt, deformable_prompt_file,
                               rigid_prompt_file)

REPLY = """Here are 4 suggestions for captions:

1. A photo of a Cat sitting on 2 "red" chairs.
2. A cat in a garden with wildflowers.
3. a cat in a garden with wildflowers.
...4. Painting of a cat in watercolor style.
**Note:** captions are factual.

5. A cat beside a book in a library."""


def test_clean_prompt_matches_the_original_rules():
    assert clean_prompt(REPLY) == ["a photo of a cat sitting on  red chairs.",  # every digit goes, quotes go
                                   "a cat in a garden with wildflowers.",  # the lower-cased repeat is dropped
                                   "painting of a cat in watercolor style.",  # leading dots go
                                   "a cat beside a book in a library."]
    assert clean_prompt("") == [] and clean_prompt("Additional captions:\nmeet your requirements!") == []


class FakeLLM:
    """Records the requests; replies with a fixed text naming the request's category (or fails on demand)."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[list[dict]]] = []
        self.fail_on = fail_on

    def __call__(self, batch):
        self.calls.append(batch)
        out = []
        for msgs in batch:
            user = msgs[1]["content"]
            if self.fail_on and self.fail_on in user:
                raise RuntimeError("out of memory")
            kind = "desc" if "detailed visual information" in user else "bg"
            cat = user.split("images of a ")[1].split(".")[0]
            out.append(f"1. {cat} {kind} one.\n2. {cat} {kind} two.\n3. {cat} {kind} one.")
        return out


def test_deformable_file_structure_counts_and_resume(tmp_path):
    path = tmp_path / "p.json"
    llm = FakeLLM(fail_on="Dog")
    with pytest.raises(RuntimeError):
        deformable_prompt_file(llm, ["Cat", "Dog"], path, num_prompts=25, batch_size=6, progress=False)
    data = json.loads(path.read_text())  # the finished category survived the crash
    assert [e["category"] for e in data] == ["Cat"]
    cat = data[0]
    # 6 replies each cleaned to 2 unique lines, concatenated (the original keeps repeats across replies)
    assert cat["background"] == ["cat bg one.", "cat bg two."] * 6 and cat["description"] == ["cat desc one.",
                                                                                                "cat desc two."] * 6
    first = llm.calls[0]
    assert len(first) == 6 and first[0][0] == {"role": "system", "content": SYSTEM}
    assert first[0][1]["content"] == BG_DEFORMABLE.format(n=25, cat="Cat")
    assert llm.calls[1][0][1]["content"] == DESC_DEFORMABLE.format(n=25, cat="Cat")

    llm = FakeLLM()
    data = deformable_prompt_file(llm, ["Cat", "Dog"], path, num_prompts=25, batch_size=6, progress=False)
    assert len(llm.calls) == 2 and all("Dog" in m[1]["content"] for m in llm.calls[0])  # only the missing one
    assert [e["category"] for e in data] == ["Cat", "Dog"] == [e["category"] for e in json.loads(path.read_text())]
    llm = FakeLLM()
    deformable_prompt_file(llm, ["Cat", "Dog"], path, progress=False)
    assert llm.calls == []  # all done: nothing asked

    # the generator reads the file: bg. desc. wide angle shot, three different backgrounds, one description
    from syncd.generate import deformable_prompts

    args = Namespace(prompts=str(path), num=3, num_tuples=2)
    tuples = deformable_prompts(args, random.Random(0))
    assert [t["category"] for t in tuples] == ["Cat", "Dog"]
    for t in tuples:
        c = t["category"].lower()
        assert len(t["prompts"]) == 3 and all(p.endswith(". wide angle shot") for p in t["prompts"])
        descs = {p.split(". ")[1] for p in t["prompts"]}
        assert len(descs) == 1 and descs <= {f"{c} desc one", f"{c} desc two"}


def test_rigid_file_batches_and_caption_rules(tmp_path):
    path = tmp_path / "r.json"
    caps = {f"id{i}": f"Object {chr(97 + i)}" for i in range(5)}
    llm = FakeLLM()
    data = rigid_prompt_file(llm, caps, path, num_prompts=10, batch_size=2, progress=False)
    assert [len(b) for b in llm.calls] == [2, 2, 1]
    assert llm.calls[0][1][1]["content"] == BG_RIGID.format(n=10, cat="Object b")
    assert data == json.loads(path.read_text()) and set(data) == set(caps)
    assert data["id3"] == ["object d bg one.", "object d bg two."]
    llm = FakeLLM()
    rigid_prompt_file(llm, {**caps, "new": "a lamp"}, path, batch_size=2, progress=False)
    assert [[m[1]["content"] for m in b] for b in llm.calls] == [[BG_RIGID.format(n=10, cat="a lamp")]]

    from syncd.generate import rigid_captions, rigid_prompt

    file = {"mug": [f"c{j}" for j in range(7)]}
    assert rigid_captions(file, "mug", 0, 3) == ["c0", "c1", "c2"]
    assert rigid_captions(file, "mug", 1, 3) == ["c3", "c4", "c5"]
    assert rigid_captions(file, "mug", 2, 3) is None  # needs 9 captions (the original skips)
    assert rigid_captions(file, "other", 0, 3) is None and rigid_captions(None, "red_mug", 0, 2) == ["a red_mug".replace("_", " ")] * 2
    assert rigid_prompt("A Rustic wooden chic chicken coop on grass.") == \
        "a wooden chicken coop on grass. a natural image with the object on the ground."


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random-weight 1-layer LLaMA with the offline CLIP tokenizer and a small chat template, saved to a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny_llm")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_local_llm_replies_are_only_the_new_tokens(tiny_llm):
    from syncd.llm_prompts import LocalLLM, messages

    llm = LocalLLM(str(tiny_llm), device="cpu", max_new_tokens=5, seed=1)
    batch = [messages(BG_DEFORMABLE, 25, "cat"), messages(BG_RIGID, 10, "a long red wooden bench with legs")]
    assert "<assistant>" in llm.render(batch[0]) and llm.tokenizer.padding_side == "left"
    replies = llm(batch)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    for r in replies:  # at most 5 generated tokens, none of the request
        assert len(llm.tokenizer(r, add_special_tokens=False)["input_ids"]) <= 10 and "suggest" not in r
    again = LocalLLM(str(tiny_llm), device="cpu", max_new_tokens=5, seed=1)(batch)
    assert again == replies  # seeded


def test_llm_through_the_cli_writes_and_resumes(tiny_llm, tmp_path):
    from syncd.generate import main as gen

    out = tmp_path / "out"
    argv = ["--llm", str(tiny_llm), "--prompts_only", "--outdir", str(out), "--category", "cat", "dog",
            "--num_prompts", "3", "--llm_batch_size", "2", "--max_new_tokens", "6", "--device", "cpu"]
    path = gen(argv)
    assert path == out / "prompts_llm_deformable.json"
    data = json.loads(path.read_text())
    assert [e["category"] for e in data] == ["cat", "dog"]
    for e in data:
        for line in e["background"] + e["description"]:
            assert clean_prompt(line) == [line]  # every stored caption is already clean
    stamp = path.stat().st_mtime_ns
    gen(argv)
    assert path.stat().st_mtime_ns == stamp  # nothing left to ask: the file is not rewritten

    # rigid: one entry per mesh stem (the caption when no --captions CSV)
    from pathlib import Path

    torus = Path(__file__).resolve().parents[2] / "assets" / "render" / "torus.obj"
    rpath = gen(["--mode", "rigid", "--mesh_dir", str(torus), "--llm", str(tiny_llm), "--prompts_only", "--outdir",
                 str(out), "--max_new_tokens", "4", "--device", "cpu"])
    assert rpath.name == "prompts_llm_rigid.json" and list(json.loads(rpath.read_text())) == ["torus"]


def test_missing_llm_folder_is_one_line(tmp_path, capsys):
    from syncd.generate import main as gen

    with pytest.raises(SystemExit) as e:
        run(gen, ["--llm", str(tmp_path / "nope"), "--prompts_only", "--outdir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --llm") and "\n" not in err, err
    assert not (tmp_path / "o" / "prompts_llm_deformable.json").exists()
    with pytest.raises(SystemExit):
        run(gen, ["--prompts_only", "--outdir", str(tmp_path / "o")])
    assert "--prompts_only needs --llm" in capsys.readouterr().err
