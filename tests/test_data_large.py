"""Large data without a stall: long samples are encoded in bounded pieces (the same tokens as one call), progress is
reported while it runs, and planning measures lengths on a bounded sample of the data, saying so."""

from __future__ import annotations

import numpy as np
import pytest

from autofit import data, planner
from tests.conftest import tiny_gpt2

WORDS = ["alpha", "beta", "gamma", "delta", "memory", "card", "model", "token", "batch", "plan", "\n", "  "]


def text_of(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))


@pytest.fixture(scope="module")
def tok():
    return data.build_tokenizer([text_of(3000)], vocab_size=300)


@pytest.fixture
def small_limits(monkeypatch):
    """The module's limits scaled down, so that kilobytes behave as the megabytes they stand for."""
    monkeypatch.setattr(data, "_PIECE_CHARS", 512)
    monkeypatch.setattr(data, "_CHUNK_CHARS", 2048)
    monkeypatch.setattr(data, "PROGRESS_CHARS", 1024)
    monkeypatch.setattr(data, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(data, "MEASURE_CHARS", 8192)
    monkeypatch.setattr(data, "MEASURE_SAMPLE_CHARS", 2048)


def test_pieces_cut_before_whitespace_and_lose_nothing():
    text = text_of(5000)
    pieces = data._pieces(text, 100)
    assert "".join(pieces) == text and all(0 < len(p) <= 100 for p in pieces)
    # each cut lies where a whitespace run starts after a word
    assert all(p[0].isspace() and not before[-1].isspace() for before, p in zip(pieces, pieces[1:]))
    assert data._pieces("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]  # no whitespace: cut hard


def test_a_long_sample_encoded_in_pieces_gives_the_tokens_of_one_call(tok, small_limits):
    text = text_of(4000, seed=1)
    whole = tok(text)["input_ids"]
    assert len(text) > 10 * data._PIECE_CHARS
    assert data.token_lengths([text, "short one"], tok).tolist() == [len(whole), len(tok("short one")["input_ids"])]
    items = data.tokenize([text], tok, seq_len=64, packing=True)
    flat = np.concatenate([s.numpy() for s in items.sequences]).tolist()
    assert flat == (whole + [tok.eos_token_id])[: len(flat)] and len(flat) == (len(whole) + 1) // 64 * 64
    cut = data.tokenize([text], tok, seq_len=64, packing=False)  # truncation needs only the start of the sample
    assert cut.sequences[0].tolist() == whole[:64] and cut.truncated == 1


def test_progress_is_reported_while_tokenizing_not_after(tok, small_limits):
    messages = []
    data.tokenize([text_of(3000, seed=2), text_of(3000, seed=3)], tok, seq_len=64, packing=True,
                  progress=messages.append)
    shares = [int(m.split("]")[1].split("%")[0]) for m in messages]
    assert len(messages) >= 5 and messages[0].startswith("tokenizing [") and "of text" in messages[0]
    assert shares[0] < 50 and shares == sorted(shares) and shares[-1] == 100


def test_large_data_is_measured_on_a_bounded_seeded_sample(tok, small_limits):
    samples = [text_of(int(n), seed=i) for i, n in enumerate(np.random.default_rng(4).integers(5, 60, size=400))]
    exact = data.token_lengths(samples, tok)
    first = data.measure_lengths(samples, tok)
    again = data.measure_lengths(samples, tok)
    assert first.measured < len(samples) == first.samples and np.array_equal(first.lengths, again.lengths)
    assert "measured on a seeded random" in first.note and "as the data is large" in first.note
    # the sample's 95th percentile lies near the whole data's
    assert abs(np.percentile(first.lengths, 95) - np.percentile(exact, 95)) <= 0.15 * np.percentile(exact, 95)


def test_a_huge_sample_is_measured_on_its_start_and_scaled(tok, small_limits):
    text = text_of(6000, seed=5)
    exact = len(tok(text)["input_ids"])
    measured = data.measure_lengths([text], tok)
    assert measured.scaled == 1 and "measured on their start and scaled" in measured.note
    assert abs(int(measured.lengths[0]) - exact) <= 0.1 * exact


def test_small_data_is_measured_exactly(tok):
    samples = [text_of(20, seed=i) for i in range(30)]
    measured = data.measure_lengths(samples, tok)
    assert measured.note == "" and np.array_equal(measured.lengths, data.token_lengths(samples, tok))


def test_a_plan_says_when_lengths_come_from_a_sample(tok, small_limits):
    samples = [text_of(40, seed=i) for i in range(300)]
    p = planner.plan(tiny_gpt2(), "cpu", dataset=samples, tokenizer=tok, effective_batch=4, method="full",
                     probe=False)
    assert p.seq_len_source == "data" and any("as the data is large" in r for r in p.reasons)


def test_a_tokenizer_is_trained_on_a_bounded_share_of_large_data(monkeypatch):
    seen = []
    from tokenizers import Tokenizer

    real = Tokenizer.train_from_iterator

    def spy(self, iterator, *args, **kwargs):
        texts = list(iterator)
        seen.append(sum(map(len, texts)))
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "train_from_iterator", spy)
    monkeypatch.setattr(data, "TOKENIZER_CHARS", 4096)
    tok = data.build_tokenizer([text_of(10_000)], vocab_size=300)
    assert seen == [4096] and tok.decode(tok("memory card")["input_ids"]) == "memory card"
