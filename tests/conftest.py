"""Shared fixtures: tiny architectures built from configs (no downloads), and the GPU marker."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_gpt2(layers: int = 2, **overrides):
    from transformers import GPT2Config

    kwargs = dict(n_layer=layers, n_embd=64, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0,
                  eos_token_id=0)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def tiny_llama(layers: int = 2, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, bos_token_id=0,
                  eos_token_id=0)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_gemma2(layers: int = 4, **overrides):
    from transformers import Gemma2Config

    kwargs = dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128,
                  sliding_window=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kwargs.update(overrides)
    return Gemma2Config(**kwargs)


@pytest.fixture
def gpt2_spec():
    from autofit import model

    return model.resolve(tiny_gpt2())


@pytest.fixture
def llama_spec():
    from autofit import model

    return model.resolve(tiny_llama())


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch, request):
    """Tests simulate afresh (the simulation cache has its own test); one worker keeps tests deterministic in time."""
    if "disk_cache" not in request.keywords:
        monkeypatch.setenv("AUTOFIT_CACHE", "off")
    monkeypatch.setenv("AUTOFIT_WORKERS", "1")
    from autofit.sim import simulate

    simulate._CACHE.clear()


def tiny_t5(layers: int = 2, **overrides):
    from transformers import T5Config

    kwargs = dict(num_layers=layers, num_decoder_layers=layers, d_model=64, d_ff=128, d_kv=16, num_heads=4,
                  vocab_size=256, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # flan-t5's (t5 v1.1) block
    kwargs.update(overrides)
    return T5Config(**kwargs)


def tiny_bart(layers: int = 2, **overrides):
    from transformers import BartConfig

    kwargs = dict(encoder_layers=layers, decoder_layers=layers, d_model=64, encoder_ffn_dim=128,
                  decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=256,
                  max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  decoder_start_token_id=2, forced_eos_token_id=2)
    kwargs.update(overrides)
    return BartConfig(**kwargs)


def tiny_bert(layers: int = 2, model_type: str = "bert", **overrides):
    from transformers import AutoConfig

    kwargs = dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  vocab_size=256, max_position_embeddings=128, num_labels=3, pad_token_id=0)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def end_rank() -> None:
    """Ends a spawned rank that has written its results and torn its process group down, without the interpreter's
    finalization. After a tracker's budget raised an out-of-memory error and a gloo collective ran, a gloo worker
    thread can outlive ``destroy_process_group`` and abort the process (std::terminate) once finalization starts,
    although the rank's work is done (seen with torch 2.13, about one spawn in four). Only called on success: a
    rank that raised still exits through the error path and its traceback."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture
def notes(tmp_path):
    """A small plain-text file to train on: one sentence, 48 paragraphs."""
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(["the model learns this sentence about small cards and big models."] * 48))
    return path
