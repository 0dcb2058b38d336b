"""Adding tokens to tokenizer(s) + text encoder(s): initialisation, validation, SDXL pairs, gradient masking."""
from __future__ import annotations

import pytest
import torch

from common.errors import UsageError
from common.models.loading import load_pipeline
from common.models.tokens import (add_tokens, add_tokens_to_pipeline, initializer_id, mask_embedding_grad,
                                  split_plus, text_pairs, token_embeddings)


@pytest.fixture
def sd():
    return load_pipeline("tiny-sd")


def test_initializer_ids_match_reference(sd):
    tok = sd.tokenizer
    # the diffusers default "ktn+pll" resolve to the LDM code's hard-coded rows 42170, 47629
    assert [initializer_id(tok, w) for w in ("ktn", "pll")] == [42170, 47629]
    assert initializer_id(tok, "dog</w>") == tok.encode("dog", add_special_tokens=False)[0]


def test_add_token_initialised_from_initializer(sd):
    emb_before = sd.text_encoder.get_input_embeddings().weight.detach().clone()
    n = len(sd.tokenizer)
    (ids,) = add_tokens_to_pipeline(sd, ["<new1>", "<new2>"], ["ktn", "pll"])
    weight = sd.text_encoder.get_input_embeddings().weight
    assert ids == [n, n + 1] and len(sd.tokenizer) == n + 2 and weight.shape[0] == n + 2
    assert torch.equal(weight[n], emb_before[42170]) and torch.equal(weight[n + 1], emb_before[47629])
    assert torch.equal(weight[:n], emb_before)
    assert sd.tokenizer("photo of a <new1> cat").input_ids[4] == n
    assert torch.equal(token_embeddings(sd, ["<new2>"])["<new2>"][0], emb_before[47629])


def test_sdxl_gets_token_in_both_encoders():
    pipe = load_pipeline("tiny-sdxl")
    vecs = [torch.randn(1, enc.get_input_embeddings().weight.shape[1]) for _, enc in text_pairs(pipe)]
    ids = add_tokens_to_pipeline(pipe, ["<new1>"], vecs)
    for (tok, enc), (i,), v in zip(text_pairs(pipe), ids, vecs):
        assert tok.convert_tokens_to_ids("<new1>") == i
        assert torch.equal(enc.get_input_embeddings().weight[i], v[0])


def test_validation_errors(sd):
    n = len(sd.tokenizer)
    with pytest.raises(UsageError, match="encodes to 2 tokens"):
        add_tokens_to_pipeline(sd, ["<new1>"], ["hello world"])
    with pytest.raises(UsageError, match="already contains the token 'dog'"):
        add_tokens_to_pipeline(sd, ["dog"], ["ktn"])
    with pytest.raises(UsageError, match="2 modifier tokens but only 1 initializer"):
        add_tokens_to_pipeline(sd, ["<new1>", "<new2>"], ["ktn"])
    with pytest.raises(UsageError, match="shape"):
        add_tokens(sd.tokenizer, sd.text_encoder, ["<new1>"], torch.zeros(1, 7))
    assert len(sd.tokenizer) == n  # refused calls change nothing
    add_tokens_to_pipeline(sd, ["<new1>"], ["ktn"])
    with pytest.raises(UsageError, match="already contains the token '<new1>'"):
        add_tokens_to_pipeline(sd, ["<new1>"], ["ktn"])


def test_mask_embedding_grad_keeps_every_modifier(sd):
    """Both modifier rows get gradient (the last one too: diffusers issue #7294); all others get none."""
    ids = add_tokens_to_pipeline(sd, ["<new1>", "<new2>"], ["ktn", "pll"])[0]
    handle = mask_embedding_grad(sd.text_encoder, ids)
    inp = sd.tokenizer(["a <new1> cat on a <new2> pot"], return_tensors="pt").input_ids
    sd.text_encoder(inp)[0].pow(2).sum().backward()
    grad = sd.text_encoder.get_input_embeddings().weight.grad
    rows = torch.nonzero(grad.abs().sum(1)).flatten().tolist()
    assert rows == sorted(ids)
    handle.remove()


def test_split_plus():
    assert split_plus("<new1>+<new2>") == ["<new1>", "<new2>"] and split_plus(None) == []
