"Integration tests of sara.text: MiniLM (offline) and the UMT5 code path on a tiny model."
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from sara.text import (MiniLMEncoder, UMT5PromptEncoder, build_text_encoder, clean_prompts,
                       make_tiny_umt5_dir)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder()


def test_minilm_offline_shapes_and_padding(minilm):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    prompts = ["a red fox jumps over a fallen log in the snow", "rain"]
    emb, mask = minilm.encode_prompts(prompts, max_length=24)
    assert emb.shape == (2, 24, 384) and mask.shape == (2, 24)
    n = mask.sum(1)
    assert n[0] > n[1] >= 3                                    # [CLS] rain [SEP]
    for i in range(2):
        assert emb[i, int(n[i]):].abs().sum() == 0             # padding zeroed
        assert (emb[i, :int(n[i])].abs().sum(-1) > 0).all()    # real tokens kept
    assert not emb.requires_grad
    assert minilm.dim == 384 and not any(p.requires_grad for p in minilm.parameters())


def test_minilm_truncates(minilm):
    emb, mask = minilm.encode_prompts(["word " * 100], max_length=8)
    assert emb.shape == (1, 8, 384) and mask.sum() == 8


def test_minilm_sentence_embeddings(minilm):
    e = minilm.embed(["a red fox jumps over a log",
                      "a fox leaping over a fallen tree trunk",
                      "quarterly earnings of a software company"])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    s = e @ e.T
    assert s[0, 1] > s[0, 2] + 0.2 and s[0, 1] > s[1, 2] + 0.2
    # padding does not change a sentence embedding (mean over real tokens only)
    alone = minilm.embed(["a red fox jumps over a log"])
    with_long = minilm.embed(["a red fox jumps over a log", "a much longer sentence " * 5])
    torch.testing.assert_close(alone[0], with_long[0], atol=1e-5, rtol=1e-5)


def test_prompt_validation(minilm):
    assert clean_prompts("  two\t spaces &amp; more ") == ["two spaces & more"]
    with pytest.raises(ValueError, match="non-empty"):
        minilm.encode_prompts([])
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        minilm.embed([None])


def test_umt5_code_path(tmp_path):
    enc = UMT5PromptEncoder(make_tiny_umt5_dir(tmp_path / "wan"), max_length=20)
    assert enc.max_length == 20 and enc.dim == 32
    emb, mask = enc.encode_prompts(["a fox", "a fox jumps over a log in the snow at dusk"])
    assert emb.shape == (2, 20, 32) and mask.shape == (2, 20)
    lens = mask.sum(1)
    assert lens[0] < lens[1]
    for i in range(2):
        assert emb[i, int(lens[i]):].abs().sum() == 0
        assert (emb[i, :int(lens[i])].abs().sum(-1) > 0).all()
    assert not emb.requires_grad and not any(p.requires_grad for p in enc.parameters())
    # default length is Wan's 512
    assert UMT5PromptEncoder(tmp_path / "wan").encode_prompts(["x"])[0].shape == (1, 512, 32)
    assert isinstance(build_text_encoder(str(tmp_path / "wan")), UMT5PromptEncoder)


def test_factory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_text_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        UMT5PromptEncoder(tmp_path / "half")


# ---------------------------------------------------------------- generic embedders
from sara.text import TextEmbedder, build_embedder, make_tiny_embedder_dir


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_embedder_dir(tmp_path_factory.mktemp("emb") / "bert")


def test_text_embedder_mean_pooling(bert_dir):
    emb = build_embedder(str(bert_dir))
    assert isinstance(emb, TextEmbedder) and emb.dim == 32 and emb.pooling == "mean"
    e = emb.embed(["a red fox", "a fallen log in the snow", "a red fox"])
    assert e.shape == (3, 32)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(e[0], e[2])
    assert not torch.allclose(e[0], e[1])
    # the mean over real tokens of the last hidden state, by hand
    tok = emb.tokenizer(["a red fox"], return_tensors="pt")
    with torch.no_grad():
        h = emb.model(**tok).last_hidden_state[0].mean(0)
    torch.testing.assert_close(e[0], torch.nn.functional.normalize(h, dim=-1))
    assert not any(p.requires_grad for p in emb.parameters())


@pytest.mark.parametrize("pooling", ["cls", "last"])
def test_text_embedder_other_poolings_ignore_padding(bert_dir, pooling):
    emb = TextEmbedder(bert_dir, pooling=pooling)
    alone = emb.embed(["a red fox"])
    padded = emb.embed(["a red fox", "a very much longer sentence about nothing at all"])
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)
    tok = emb.tokenizer(["a red fox"], return_tensors="pt")
    with torch.no_grad():
        h = emb.model(**tok).last_hidden_state[0]
    want = h[0] if pooling == "cls" else h[-1]
    torch.testing.assert_close(alone[0], torch.nn.functional.normalize(want, dim=-1))


def test_sentence_transformers_layout(tmp_path):
    emb = build_embedder(str(make_tiny_embedder_dir(tmp_path / "st", sentence_transformers=True)))
    assert emb.pooling == "cls" and emb.embed(["x"]).shape == (1, 32)
    assert TextEmbedder(tmp_path / "st", pooling="mean").pooling == "mean"  # explicit choice wins


def test_embedder_errors(tmp_path, bert_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_embedder(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextEmbedder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="pooling must be one of"):
        TextEmbedder(bert_dir, pooling="max")
    with pytest.raises(ValueError, match="non-empty"):
        TextEmbedder(bert_dir).embed([])
    assert build_embedder("minilm").dim == 384


def test_text_encoder_for_loads_umt5_in_the_asked_dtype(tmp_path):
    "Precompute, validation sampling and evaluation build the prompt encoder through text_encoder_for: UMT5 in the run's precision (UMT5-XXL: 11 GB in bf16, 23 in float32)."
    from sara.text import text_encoder_for
    wan = str(make_tiny_umt5_dir(tmp_path / "wan"))
    enc = text_encoder_for(wan, "cpu", torch.bfloat16)
    assert isinstance(enc, UMT5PromptEncoder) and {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in text_encoder_for(wan, "cpu").parameters()} == {torch.float32}


def test_sampling_prompt_dtype_follows_the_run():
    from sara.config import make_config
    from sara.sampling import prompt_dtype
    assert prompt_dtype(make_config(dict(mixed_precision="bf16", device="cpu"))) == torch.bfloat16
    assert prompt_dtype(make_config(dict(mixed_precision="no"))) == torch.float32
