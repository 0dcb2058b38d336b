"""Benchmark layouts parsed from fixtures the tests write, placeholder filling, token stripping."""
from __future__ import annotations

import pytest

from common.errors import UsageError
from common.eval.datasets import fill_prompt, load_customconcept101, load_dreambench, strip_tokens
from eval_fixtures import write_customconcept101, write_dreambench


def test_customconcept101_single_and_multi(tmp_path):
    root = write_customconcept101(tmp_path / "cc101")
    single = load_customconcept101(root)
    assert [t.name for t in single.tasks] == ["pet_cat1", "furniture_chair1"]
    cat = single.tasks[0]
    assert cat.concepts[0].token == "<new1>" and cat.concepts[0].class_word == "cat"
    assert [p.name for p in cat.concepts[0].references] == ["0.jpg", "1.jpg", "2.jpg"]
    assert cat.prompts() == ["photo of a <new1> cat", "<new1> cat in the snow"]  # blank line skipped
    assert cat.prompts(with_token=False) == ["photo of a cat", "cat in the snow"]
    multi = load_customconcept101(root, multi=True)
    (pair,) = multi.tasks
    assert pair.name == "pet_cat1+furniture_chair1" and pair.index == 0
    assert pair.prompts() == ["<new1> cat sitting on <new2> chair", "<new2> chair next to <new1> cat on the beach"]
    assert pair.prompts(False)[1] == "chair next to cat on the beach"


def test_dreambench_layout(tmp_path):
    bench = load_dreambench(write_dreambench(tmp_path / "db"))
    assert [t.name for t in bench.tasks] == ["backpack", "dog"]
    backpack, dog = bench.tasks
    assert backpack.prompts() == ["a sks backpack in the jungle", "a sks backpack in the snow"]  # object list
    assert len(dog.templates) == 3 and dog.prompts(False)[1] == "a dog wearing a red hat"  # live list
    assert len(dog.concepts[0].references) == 2


def test_fill_and_strip():
    assert fill_prompt("{} in the snow", ["<new1> cat"]) == "<new1> cat in the snow"
    assert fill_prompt("{1} and {0}", ("a", "b")) == "b and a"
    assert strip_tokens("photo of a <new1> cat with <new2>  chair") == "photo of a cat with chair"
    with pytest.raises(UsageError, match="cannot fill"):
        fill_prompt("{0} and {1}", ["only one"])


def test_layout_errors(tmp_path):
    with pytest.raises(UsageError, match="dataset.json not found"):
        load_customconcept101(tmp_path)
    root = write_customconcept101(tmp_path / "cc101")
    (root / "prompts" / "cat.txt").unlink()
    with pytest.raises(UsageError, match="prompt file not found"):
        load_customconcept101(root)
    with pytest.raises(UsageError, match="prompts_and_classes.txt"):
        load_dreambench(tmp_path)
