"""Seq2seq data: source and target pairs, and the two lengths an encoder-decoder is planned with.

A pairs file is JSON lines (or a JSON list) of objects with ``source`` and ``target`` strings (``input``/``output``
and ``prompt``/``completion`` are read the same way). Each side is measured with the model's tokenizer and gets its
own length: the 95th percentile, rounded up to a multiple of 64, as ``autofit.data`` chooses one for a decoder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autofit import data
from autofit.errors import DataError

# the field names a pair may use, in the order they are tried
PAIR_FIELDS = (("source", "target"), ("input", "output"), ("prompt", "completion"))


@dataclass(frozen=True, kw_only=True, slots=True)
class PairLengths:
    """Source and target lengths chosen from measured pairs (tokens)."""

    source: data.SeqChoice
    target: data.SeqChoice

    def reason(self) -> str:
        return (f"source length {self.source.seq_len} and target length {self.target.seq_len}: the "
                f"{self.source.percentile:g}th percentiles of {self.source.samples} pairs ({self.source.percentile_tokens}"
                f" and {self.target.percentile_tokens} tokens), rounded up to multiples of 64; "
                f"{self.source.truncated_share:.1%} of sources and {self.target.truncated_share:.1%} of targets truncated")


def is_pairs_file(path) -> bool:
    """Whether ``path`` is a JSON-lines or JSON file whose first record is a source/target pair."""
    if not isinstance(path, (str, os.PathLike)) or Path(path).suffix not in (".jsonl", ".json"):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().strip()
        record = json.loads(first) if first and first != "[" else None
    except (OSError, ValueError, RecursionError):  # not readable as pairs: the text-data path says why
        return False
    return isinstance(record, dict) and any(s in record and t in record for s, t in PAIR_FIELDS)


def load_pairs(path) -> list[tuple[str, str]]:
    """The (source, target) pairs in a JSON-lines or JSON file. Raises ``DataError`` naming the bad record."""
    name = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read {name}: {err.strerror}; check the path") from None
    except UnicodeDecodeError:
        raise DataError(f"{name} is not UTF-8 text; save it as UTF-8 JSON lines of source/target pairs") from None
    stripped = text.lstrip()
    try:
        records = (json.loads(stripped) if stripped.startswith("[")
                   else [json.loads(line) for line in text.splitlines() if line.strip()])
    except (ValueError, RecursionError) as err:
        raise DataError(f"{name} is not JSON lines ({str(err).splitlines()[0]}); write one "
                        '{"source": ..., "target": ...} object per line') from None
    pairs = []
    for number, record in enumerate(records, 1):
        keys = next(((s, t) for s, t in PAIR_FIELDS if isinstance(record, dict) and s in record and t in record), None)
        if keys is None or not all(isinstance(record[k], str) for k in keys):
            raise DataError(f"{name} record {number} is not a pair of strings; give each record "
                            '"source" and "target" text')
        pairs.append((record[keys[0]], record[keys[1]]))
    if not pairs:
        raise DataError(f"{name} holds no pairs; write one {{\"source\": ..., \"target\": ...}} object per line")
    return pairs


def choose_lengths(pairs: list[tuple[str, str]], tokenizer, *, max_positions: int | None) -> PairLengths:
    """The source and target lengths for ``pairs`` measured with ``tokenizer`` (special tokens included)."""
    sources = np.array([len(tokenizer(s)["input_ids"]) for s, _ in pairs], dtype=np.int64)
    targets = np.array([len(tokenizer(t)["input_ids"]) for _, t in pairs], dtype=np.int64)
    return PairLengths(source=data.choose_seq_len(sources, max_positions=max_positions),
                       target=data.choose_seq_len(targets, max_positions=max_positions))


def is_pairs(dataset) -> bool:
    """Whether ``dataset`` is seq2seq data: a pairs file, or a list of (source, target) string pairs."""
    if isinstance(dataset, (list, tuple)):
        return bool(dataset) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                     and all(isinstance(x, str) for x in p) for p in dataset)
    return is_pairs_file(dataset)


def lengths_for(spec, dataset, tokenizer, seq_len: int | None):
    """(spec with the target length, source length, reason) for an encoder-decoder planned on ``dataset`` (pairs);
    a given ``seq_len`` or ``spec.target_len`` is kept. Raises ``ConfigError`` without a tokenizer."""
    from dataclasses import replace

    from autofit.errors import ConfigError

    pairs = [tuple(p) for p in dataset] if isinstance(dataset, (list, tuple)) else load_pairs(dataset)
    tok = tokenizer or data.load_tokenizer(spec.name)
    if tok is None:
        raise ConfigError(f"no tokenizer for {spec.name} in a local directory or the Hugging Face cache; pass "
                          "tokenizer=..., or seq_len=... and a target length (model.resolve(name, target_len=N))")
    lengths = choose_lengths(pairs, tok, max_positions=spec.max_positions)
    target = spec.target_len or lengths.target.seq_len
    return replace(spec, target_len=target), seq_len or lengths.source.seq_len, lengths.reason()
