"""Reads fine-tuning data, measures its token lengths, and turns it into training batches.

A sample is either a string or a chat: a list of ``{"role": ..., "content": ...}`` messages. ``load_samples`` reads
them from a file, ``token_lengths`` and ``choose_seq_len`` pick a sequence length from the data, and ``tokenize`` and
``collate`` make the tensors a training step consumes. ``build_tokenizer`` trains a small tokenizer from the samples
so that demos and tests need no download; ``load_tokenizer`` finds a real one on disk and never touches the network.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autofit import validate
from autofit.errors import ConfigError, DataError, ModelError
from autofit.sim.arch import ModelSpec
from autofit.units import fmt_bytes

log = logging.getLogger(__name__)

Chat = list[dict]
Sample = str | Chat

TEXT_SUFFIXES = ("", ".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")

# ShareGPT speaker names ("from") mapped to the roles chat templates expect; other names pass through as they are.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                   "model": "assistant", "system": "system"}
_RECORD_FIELDS = "text, messages, conversations, prompt+completion or instruction(+input)+output"

# The Alpaca layout without its preamble; the Input section is left out when a record has no input.
_INSTRUCTION = "### Instruction:\n{instruction}\n\n"
_INPUT = "### Input:\n{input}\n\n"
_RESPONSE = "### Response:\n{output}"

# Files one of which a directory must hold to have a tokenizer: without them transformers 5 still "loads" an empty
# tokenizer of the config's class, which would measure nonsense.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")

# Texts per call to a fast tokenizer: large enough for its Rust threads to pay off, small enough to bound memory.
_BATCH = 1024
# Characters per call, and the longest piece of one sample encoded at once. Encoding a 46 MB one-line file in one call
# took 67 s and 9 GB (the encoding keeps every token's string and offsets); cut at whitespace into 64 KiB pieces, 1 MiB
# per call, it takes half the time in 0.7 GB and reports progress as it goes (measured on 2 CPU cores).
_CHUNK_CHARS = 1 << 20
_PIECE_CHARS = 1 << 16
# Planning measures lengths on at most MEASURE_CHARS of text: a seeded random subset of the samples when the data is
# larger, and each sample longer than MEASURE_SAMPLE_CHARS measured on its start and scaled by its length. Lengths
# past 256 KiB of text (some 64K tokens) are beyond most models' positions: they only need to be known as long.
MEASURE_CHARS = 4 << 20
MEASURE_SAMPLE_CHARS = 1 << 18
# build_tokenizer trains on at most this much text (a seeded random subset): 4 MiB trains in about 4 s.
TOKENIZER_CHARS = 4 << 20
# Progress is reported for data of at least this much text, at most every PROGRESS_SECONDS.
PROGRESS_CHARS = 1 << 20
PROGRESS_SECONDS = 0.5

# Special tokens of the tokenizers build_tokenizer trains.
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


# -- reading files -----------------------------------------------------------------------------------------------------
def load_samples(path: str | os.PathLike) -> list[Sample]:
    """The samples in a data file, in file order.

    Plain text (``.txt``, ``.md`` or no extension): samples are separated by blank lines; a file with no blank line
    between its lines holds one sample per non-empty line.

    JSON (``.jsonl``, or ``.json`` holding JSON lines, one JSON array or one object): each record gives one sample,
    taken from the first of these it has:

    - ``"text"``: the string itself;
    - ``"messages"`` or ``"conversations"``: a chat, either ``{"role", "content"}`` messages or ShareGPT's
      ``{"from": "human"/"gpt", "value"}`` (mapped to user/assistant);
    - ``"prompt"`` and ``"completion"``: both strings give ``prompt + "\\n" + completion`` (no newline when either
      side already has whitespace there); both chats give one chat;
    - ``"instruction"`` (optional ``"input"``) and ``"output"``: the Alpaca layout without its preamble,
      ``"### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n..."``, the Input section left out
      when there is no input.

    A record that is a bare JSON string is a text sample. Blank samples are dropped with a warning. Raises
    ``DataError`` for a missing, empty, all-blank, undecodable or unrecognised file, and for a record with none of the
    fields above (naming its line, or its index in an array).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSON_SUFFIXES:
        raise DataError(f"cannot read {suffix} files ({path.name}); convert it to .jsonl, .json or .txt")
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a .jsonl, .json or .txt file")
    if not path.is_file():
        raise DataError(f"{path} is not a file; pass a .jsonl, .json or .txt file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: files saved by Windows tools start with a BOM
    except UnicodeDecodeError as err:
        raise DataError(f"{path.name} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}; check its permissions") from None
    if not text.strip():
        raise DataError(f"{path.name} is empty; put one sample per record (or per paragraph) in it")
    try:
        samples = _text_samples(text) if suffix in TEXT_SUFFIXES else _json_samples(text, path.name)
    except RecursionError:
        raise DataError(f"{path.name} nests JSON deeper than Python can read; give each record a flat text, chat, "
                        "prompt/completion or instruction/output field") from None
    log.debug("read %d samples from %s", len(samples), path)
    return validate.samples(samples, path.name)


def _text_samples(text: str) -> list[str]:
    blocks, block = [], []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    if block:
        blocks.append(block)
    if len(blocks) == 1:  # no blank line between lines: one sample per line
        return blocks[0]
    return ["\n".join(block) for block in blocks]


def _json_samples(text: str, name: str) -> list[Sample]:
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{name} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; "
                            "fix it, or write one JSON record per line") from None
        except ValueError as err:  # a number of more digits than Python converts, say
            raise DataError(f"{name} cannot be read as JSON ({str(err).splitlines()[0]}); fix it") from None
        if not records:
            raise DataError(f"{name} holds an empty JSON array; put one record per sample in it")
        return [_record_sample(record, name, f"record {i}") for i, record in enumerate(records, 1)]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            try:  # a .json file holding one object written over several lines
                return [_record_sample(json.loads(text), name, "record 1")]
            except ValueError:
                pass
            raise DataError(f"{name} line {number} is not valid JSON: {err.msg} (column {err.colno}); "
                            "fix or remove that line") from None
        except ValueError as err:  # a number of more digits than Python converts, say
            raise DataError(f"{name} line {number} cannot be read as JSON ({str(err).splitlines()[0]}); fix or "
                            "remove that line") from None
    return [_record_sample(record, name, f"line {number}") for number, record in records]


def _record_sample(record, name: str, where: str) -> Sample:
    """The sample in one JSON record; ``where`` ("line 3", "record 3") places it in error messages."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{name} {where} is a JSON {type(record).__name__}, not an object; "
                        f"give each record one of {_RECORD_FIELDS}")
    if "text" in record:
        return _field_str(record, "text", name, where)
    for key in ("messages", "conversations"):
        if key in record:
            return _chat(record[key], name, f"{where} {key}")
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return _chat(prompt, name, f"{where} prompt") + _chat(completion, name, f"{where} completion")
        prompt, completion = _field_str(record, "prompt", name, where), _field_str(record, "completion", name, where)
        joint = "" if not prompt or not completion or prompt[-1].isspace() or completion[0].isspace() else "\n"
        return prompt + joint + completion
    if "instruction" in record and "output" in record:
        instruction = _field_str(record, "instruction", name, where)
        extra = _field_str(record, "input", name, where) if record.get("input") is not None else ""
        output = _field_str(record, "output", name, where)
        text = _INSTRUCTION.format(instruction=instruction)
        if extra.strip():
            text += _INPUT.format(input=extra)
        return text + _RESPONSE.format(output=output)
    found = ", ".join(sorted(k if k.isprintable() else repr(k) for k in record)) or "none"
    raise DataError(f"{name} {where} has none of the fields {_RECORD_FIELDS} (it has: {found}); "
                    "rename its fields to one of those")


def _field_str(record: dict, key: str, name: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{name} {where} field {key!r} is a JSON {type(value).__name__}, not a string; "
                        "make it a string")
    return value


def _chat(messages, name: str, where: str) -> Chat:
    """``messages`` as ``{"role", "content"}`` dicts; ShareGPT ``{"from", "value"}`` messages are mapped."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{name} {where} is not a non-empty list of messages; "
                        'write it as [{"role": "user", "content": "..."}, ...]')
    chat = []
    for i, message in enumerate(messages, 1):
        if isinstance(message, dict) and "role" in message and "content" in message:
            chat.append({**message, "content": _content(message["content"], name, f"{where} message {i}")})
        elif isinstance(message, dict) and "from" in message and "value" in message:
            speaker = str(message["from"])
            role = _SHAREGPT_ROLES.get(speaker.lower(), speaker)
            chat.append({"role": role, "content": _content(message["value"], name, f"{where} message {i}")})
        else:
            raise DataError(f"{name} {where} message {i} has neither role+content nor from+value; "
                            'write it as {"role": "user", "content": "..."}')
    return chat


def _content(content, name: str, where: str) -> str:
    if content is None:  # an assistant turn that only calls tools
        return ""
    if isinstance(content, str):
        return content
    # OpenAI's multi-part content: keep the text parts, in order
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(part["text"] for part in content if part.get("type", "text") == "text" and "text" in part)
    raise DataError(f"{name} {where} content is a JSON {type(content).__name__}, not a string; make it a string")


# -- rendering and measuring -------------------------------------------------------------------------------------------
def render(sample: Sample, tokenizer=None) -> str:
    """The text a model sees for ``sample``.

    A string stays as it is. A chat goes through ``tokenizer``'s chat template when it has one, else becomes one
    ``role: content`` line per message. Raises ``DataError`` for anything that is not a sample, or a chat the
    template rejects.
    """
    if isinstance(sample, str):
        return sample
    if not isinstance(sample, list) or not all(isinstance(m, dict) and "role" in m for m in sample):
        raise DataError(f"a sample must be a string or a list of role/content messages, not {type(sample).__name__}; "
                        "read data with load_samples")
    if _has_template(tokenizer):
        import jinja2

        try:
            text = tokenizer.apply_chat_template(sample, tokenize=False)
        except jinja2.TemplateError as err:  # templates raise this for, say, roles that do not alternate
            raise DataError(f"the tokenizer's chat template rejects a chat: {err}; fix that sample") from None
        if not isinstance(text, str):
            raise DataError("the tokenizer's chat template did not return text; pass a tokenizer with a string "
                            "chat template")
        return text
    return "\n".join(f"{message['role']}: {message.get('content') or ''}" for message in sample)


def _has_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


class _Meter:
    """Reports how much of the text a long job has done, as a bar, at most every ``PROGRESS_SECONDS``."""

    def __init__(self, progress: Callable[[str], None] | None, total: int, label: str) -> None:
        self.progress = progress if progress is not None and total >= PROGRESS_CHARS else None
        self.total, self.label, self.done, self.last = max(total, 1), label, 0, 0.0

    def add(self, chars: int) -> None:
        self.done += chars
        now = time.monotonic()
        if self.progress is None or (now - self.last < PROGRESS_SECONDS and self.done < self.total):
            return
        self.last = now
        share = min(1.0, self.done / self.total)
        bar = "#" * round(20 * share) + "-" * (20 - round(20 * share))
        self.progress(f"{self.label} [{bar}] {share:4.0%} of {fmt_bytes(self.total)} of text")


def _pieces(text: str, size: int | None = None) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters (default ``_PIECE_CHARS``), each cut where a run of
    whitespace starts after a word, when the window has one. Byte-level BPE pre-tokenizers (GPT-2's, Llama 3's) split
    text into words and whitespace runs with a leading space going to the next word, and no match spans such a
    boundary, so cutting there gives the tokens of the uncut text."""
    size = size or _PIECE_CHARS
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = end - 1
            while cut > start and not text[cut].isspace():  # the window's last whitespace...
                cut -= 1
            while cut > start and text[cut - 1].isspace():  # ...back to the start of its run
                cut -= 1
            if cut > start:
                end = cut
        pieces.append(text[start:end])
        start = end
    return pieces


def _affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens ``tokenizer`` adds before and after a text (a Llama BOS; nothing for GPT-2)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare):])
    return [], []


def _encode_long(text: str, tokenizer, add_special: bool, meter: _Meter, limit: int | None) -> list[int]:
    """The tokens of one long text, encoded in pieces; with ``limit``, only until more than ``limit`` are known."""
    out: list[int] = []
    pieces = _pieces(text)
    per_call = max(1, _CHUNK_CHARS // _PIECE_CHARS)
    for start in range(0, len(pieces), per_call):
        batch = pieces[start:start + per_call]
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for row in encoded["input_ids"]:
            out.extend(row)
        meter.add(sum(map(len, batch)))
        if limit is not None and len(out) > limit:
            meter.add(len(text) - sum(map(len, pieces[:start + per_call])))
            break
    if add_special:
        before, after = _affixes(tokenizer)
        out = before + out + after
    return out


def _encode(samples: Sequence[Sample], tokenizer, *, progress: Callable[[str], None] | None = None,
            label: str = "tokenizing", limit: int | None = None) -> list[list[int]]:
    """Token ids of each rendered sample, with special tokens as the tokenizer adds them.

    Chats rendered by a chat template are the exception: templates write their own special tokens (a Llama 3
    template starts with ``<|begin_of_text|>``), so adding them again would count the BOS twice. Samples go to the
    tokenizer in calls of at most ``_BATCH`` texts and ``_CHUNK_CHARS`` characters; a sample longer than
    ``_PIECE_CHARS`` is encoded in pieces cut at whitespace (with ``limit``, only until it has more than ``limit``
    tokens: enough to know it will be truncated). ``progress`` hears how far it got.
    """
    templated = _has_template(tokenizer)
    texts = [render(sample, tokenizer) for sample in samples]
    special = [not (templated and not isinstance(sample, str)) for sample in samples]
    meter = _Meter(progress, sum(map(len, texts)), label)
    ids: list[list[int] | None] = [None] * len(samples)

    def run(chunk: list[int], add_special: bool) -> None:
        # verbose=False: no "longer than the model's maximum" warning; measuring long samples is the point
        encoded = tokenizer([texts[i] for i in chunk], add_special_tokens=add_special, return_attention_mask=False,
                            verbose=False)
        for i, row in zip(chunk, encoded["input_ids"]):
            ids[i] = row
        meter.add(sum(len(texts[i]) for i in chunk))

    long = []
    for add_special in (True, False):
        chunk, chars = [], 0
        for i in range(len(samples)):
            if special[i] != add_special:
                continue
            if len(texts[i]) > _PIECE_CHARS:
                long.append(i)
                continue
            chunk.append(i)
            chars += len(texts[i])
            if len(chunk) >= _BATCH or chars >= _CHUNK_CHARS:
                run(chunk, add_special)
                chunk, chars = [], 0
        if chunk:
            run(chunk, add_special)
    for i in long:
        ids[i] = _encode_long(texts[i], tokenizer, special[i], meter, limit)
    return ids


def token_lengths(samples: Sequence[Sample], tokenizer, *,
                  progress: Callable[[str], None] | None = None) -> np.ndarray:
    """Tokens in each rendered sample (int64, one per sample), special tokens included as the tokenizer adds them.

    Chats rendered by a chat template are tokenized without adding special tokens, since the template already
    wrote them. ``tokenize`` appends an EOS where the tokenizer adds none, so a training item can be one longer.
    """
    rows = _encode(samples, tokenizer, progress=progress, label="measuring lengths")
    return np.array([len(row) for row in rows], dtype=np.int64)


@dataclass(frozen=True, kw_only=True, slots=True)
class MeasuredLengths:
    """Token lengths for choosing a sequence length: every sample's, or a bounded sample's when the data is large."""

    lengths: np.ndarray  # int64 tokens per measured sample
    measured: int  # samples measured
    samples: int  # samples in the data
    scaled: int  # samples longer than MEASURE_SAMPLE_CHARS, measured on their start and scaled by their length
    note: str  # "" when exact, else what was measured ("; measured on ..."), for a plan's reasons


def measure_lengths(samples: Sequence[Sample], tokenizer, *, progress: Callable[[str], None] | None = None,
                    budget_chars: int | None = None) -> MeasuredLengths:
    """Token lengths of ``samples``, from at most ``budget_chars`` (default ``MEASURE_CHARS``) of text.

    Small data is measured whole and exactly. Larger data is measured on a seeded random subset of samples (the same
    data gives the same subset) and a sample longer than ``MEASURE_SAMPLE_CHARS`` on its start, its length scaled by
    the share of its text measured; ``note`` says so. Raises ``DataError`` for no samples.
    """
    if not samples:
        raise DataError("no samples to measure; check that the data holds samples")
    budget_chars = budget_chars or MEASURE_CHARS
    sizes = np.array([len(s) if isinstance(s, str) else len(render(s)) for s in samples], dtype=np.int64)
    capped = np.minimum(sizes, MEASURE_SAMPLE_CHARS)
    if sizes.sum() <= budget_chars and not (sizes > MEASURE_SAMPLE_CHARS).any():
        lengths = token_lengths(samples, tokenizer, progress=progress)
        return MeasuredLengths(lengths=lengths, measured=len(samples), samples=len(samples), scaled=0, note="")
    order = np.random.default_rng(0).permutation(len(samples))
    used = np.cumsum(capped[order])
    chosen = np.sort(order[: max(1, int(np.searchsorted(used, budget_chars, side="right")))])
    heads, scale = [], []
    for i in chosen:
        sample = samples[i]
        if isinstance(sample, str) and sizes[i] > MEASURE_SAMPLE_CHARS:
            heads.append(sample[:MEASURE_SAMPLE_CHARS])
            scale.append(sizes[i] / MEASURE_SAMPLE_CHARS)
        else:
            heads.append(sample)
            scale.append(1.0)
    counted = token_lengths(heads, tokenizer, progress=progress)
    lengths = np.rint(counted * np.array(scale)).astype(np.int64)
    scaled = sum(1 for f in scale if f != 1.0)
    parts = []
    if len(chosen) < len(samples):
        parts.append(f"measured on a seeded random {len(chosen):,} of {len(samples):,} samples "
                     f"({fmt_bytes(int(capped[chosen].sum()))} of {fmt_bytes(int(sizes.sum()))} of text), as the data "
                     "is large")
    if scaled:
        parts.append(f"{scaled:,} sample(s) longer than {fmt_bytes(MEASURE_SAMPLE_CHARS)} of text measured on their "
                     "start and scaled by their length")
    note = "; " + "; ".join(parts)
    log.info("lengths %s", note[2:])
    return MeasuredLengths(lengths=lengths, measured=len(chosen), samples=len(samples), scaled=scaled, note=note)


# -- choosing a sequence length ----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class SeqChoice:
    """A sequence length chosen from measured sample lengths (all lengths in tokens)."""

    seq_len: int
    percentile: float  # the percentile asked for, in [0, 100]
    percentile_tokens: int  # the length at that percentile, before rounding
    truncated_share: float  # share of samples longer than seq_len, in [0, 1]
    max_tokens: int  # the longest sample
    samples: int  # how many lengths were measured

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be at least 1; got {self.seq_len}")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must lie in [0, 100]; got {self.percentile}")
        if not 0 <= self.percentile_tokens <= self.max_tokens:
            raise ValueError(f"percentile_tokens must lie in [0, max_tokens={self.max_tokens}]; "
                             f"got {self.percentile_tokens}")
        if not 0.0 <= self.truncated_share <= 1.0:
            raise ValueError(f"truncated_share must lie in [0, 1]; got {self.truncated_share}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1; got {self.samples}")


def truncated_share(lengths, seq_len: int) -> float:
    """The share of ``lengths`` (tokens) longer than ``seq_len``: the samples a cut at ``seq_len`` shortens."""
    lengths = _lengths_array(lengths)
    return int(np.count_nonzero(lengths > seq_len)) / lengths.size


def choose_seq_len(lengths, *, max_positions: int | None, percentile: float = 95.0, multiple: int = 64,
                   minimum: int = 64) -> SeqChoice:
    """A sequence length that fits ``percentile`` percent of the samples whole.

    The percentile is the smallest measured length that at least ``percentile`` percent of samples do not exceed
    (numpy's ``inverted_cdf``), so ``truncated_share <= 1 - percentile / 100`` before any cap. It is rounded up to a
    multiple of ``multiple`` (kernels and tensor cores run best on such shapes), raised to ``minimum``, and capped at
    ``max_positions`` (the model's position limit; ``None`` for none), which is used as is when rounding would pass
    it. Raises ``DataError`` for no lengths and ``ConfigError`` for knobs out of range.
    """
    lengths = _lengths_array(lengths)
    if not 0.0 <= percentile <= 100.0:
        raise ConfigError(f"percentile must lie in [0, 100]; got {percentile}")
    for knob, value in (("multiple", multiple), ("minimum", minimum), ("max_positions", max_positions)):
        if value is not None and value < 1:
            raise ConfigError(f"{knob} must be at least 1; got {value}")
    at_percentile = int(np.percentile(lengths, percentile, method="inverted_cdf"))
    seq_len = max(math.ceil(at_percentile / multiple) * multiple, minimum)
    if max_positions is not None and seq_len > max_positions:
        seq_len = max_positions
    return SeqChoice(seq_len=seq_len, percentile=float(percentile), percentile_tokens=at_percentile,
                     truncated_share=truncated_share(lengths, seq_len), max_tokens=int(lengths.max()),
                     samples=int(lengths.size))


def _lengths_array(lengths) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size == 0:
        raise DataError("no sample lengths to choose from; check that the data file holds samples")
    if lengths.min() < 0:
        raise DataError(f"sample lengths cannot be negative; got {int(lengths.min())}")
    return lengths


# -- tokenizers --------------------------------------------------------------------------------------------------------
def load_tokenizer(model_ref):
    """The tokenizer of ``model_ref`` from disk, or None where there is none; never touches the network.

    ``model_ref`` is a directory (or a file in one, such as its ``config.json``), a repo id looked up in the local
    Hugging Face cache only, a ``ModelSpec`` (by its name), or a tokenizer (returned as is). Raises ``ModelError``
    for a reference of another type, or a directory whose tokenizer files do not load.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(model_ref, PreTrainedTokenizerBase):
        return model_ref
    if isinstance(model_ref, ModelSpec):
        model_ref = model_ref.name
    if not isinstance(model_ref, (str, os.PathLike)):
        raise ModelError(f"cannot find a tokenizer for a {type(model_ref).__name__}; pass a model name or directory")
    text = os.fspath(model_ref).strip()
    if not text:
        return None
    path = Path(text).expanduser()
    if path.exists():
        directory = path if path.is_dir() else path.parent
        if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
            log.info("no tokenizer files in %s", directory)
            return None
        try:
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
            raise ModelError(f"cannot load the tokenizer in {directory}: {_first_line(err)}; "
                             "fix or remove its tokenizer files") from None
    if not _in_hf_cache(text):
        log.info("no tokenizer for %s in the local Hugging Face cache", text)
        return None
    try:
        return AutoTokenizer.from_pretrained(text, local_files_only=True)
    except (OSError, ValueError) as err:  # a cache holding only part of the tokenizer's files
        log.warning("cannot load the cached tokenizer of %s: %s", text, _first_line(err))
        return None


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(repo_id, name) for name in _TOKENIZER_FILES]
    except Exception:  # a malformed repo id, or no cache at all
        return False
    return any(isinstance(path, str) and os.path.isfile(path) for path in found)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def build_tokenizer(samples: Sequence[Sample], *, vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on ``samples`` (rendered without a chat template).

    For demos and tests that must not download anything. Any text round-trips through it, since every byte has a
    token. It has ``<s>`` (bos), ``</s>`` (eos), ``<pad>`` and ``<unk>`` tokens and adds none of them when it
    encodes, as GPT-2 does; ``tokenize`` appends the EOS. The same samples give the same tokenizer. Data of more than
    ``TOKENIZER_CHARS`` trains it on a seeded random share of that size, so a large file starts in seconds. Returns a
    ``transformers.PreTrainedTokenizerFast``; raises ``DataError`` when there are no samples.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [render(sample) for sample in samples]
    if not texts:
        raise DataError("no samples to train a tokenizer on; check that the data file holds samples")
    if sum(map(len, texts)) > TOKENIZER_CHARS:  # a seeded random share of the text: the tokenizer trains in seconds
        order = np.random.default_rng(0).permutation(len(texts))
        kept, room = [], TOKENIZER_CHARS
        for i in order:
            if room <= 0:
                break
            kept.append(texts[i][:room])
            room -= len(kept[-1])
        texts = kept
    specials = [EOS, PAD, BOS, UNK]
    if vocab_size < 256 + len(specials):
        raise ConfigError(f"vocab_size must be at least {256 + len(specials)} (every byte plus the special tokens); "
                          f"got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)


# -- training items ----------------------------------------------------------------------------------------------------
class TokenizedDataset(torch.utils.data.Dataset):
    """Token sequences ready for a causal-LM step: each item holds 1-D int64 ``input_ids``, ``attention_mask``
    (all ones) and ``labels`` (equal to ``input_ids``); ``collate`` pads them into a batch.

    ``lengths`` holds each item's tokens; ``truncated`` counts the samples that lost tokens.
    """

    def __init__(self, sequences: list[torch.Tensor], *, truncated: int, seq_len: int, packing: bool) -> None:
        self.sequences = sequences
        self.truncated = truncated
        self.seq_len = seq_len
        self.packing = packing
        self.lengths = np.array([len(s) for s in sequences], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.sequences[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def __repr__(self) -> str:
        return (f"TokenizedDataset(items={len(self)}, seq_len={self.seq_len}, packing={self.packing}, "
                f"tokens={int(self.lengths.sum())}, truncated={self.truncated})")


def tokenize(samples: Sequence[Sample], tokenizer, *, seq_len: int, packing: bool,
             progress: Callable[[str], None] | None = None) -> TokenizedDataset:
    """Training items of at most ``seq_len`` tokens from ``samples``.

    Each sample is tokenized as ``token_lengths`` measures it, then ends with the EOS (appended unless the tokenizer
    put one there). Without packing, each sample is one item, cut to ``seq_len``; ``truncated`` counts the samples
    cut. With packing, all samples are concatenated and cut into blocks of exactly ``seq_len``; the remainder that
    does not fill a block is dropped, unless it is the only block, and ``truncated`` counts the samples that lost
    tokens to that drop. Raises ``DataError`` for ``seq_len < 2`` (a causal LM predicts each token from the ones
    before it), a tokenizer without an EOS, or no tokens at all. ``progress`` hears how far tokenizing got.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 to train on next-token prediction; got {seq_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token to end samples with; set tokenizer.eos_token")
    encoded = _encode(samples, tokenizer, progress=progress, limit=None if packing else seq_len)
    rows = [row if row and row[-1] == eos else row + [eos] for row in encoded]
    if packing:
        sequences, truncated = _pack(rows, seq_len)
    else:
        sequences = [torch.tensor(row[:seq_len], dtype=torch.long) for row in rows]
        truncated = sum(len(row) > seq_len for row in rows)
    if not sequences:
        raise DataError("no tokens left after tokenization; check that the samples hold text")
    dataset = TokenizedDataset(sequences, truncated=truncated, seq_len=seq_len, packing=packing)
    log.debug("tokenized %d samples into %r", len(rows), dataset)
    return dataset


def _pack(rows: list[list[int]], seq_len: int) -> tuple[list[torch.Tensor], int]:
    ends = np.cumsum([len(row) for row in rows], dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        return [], 0
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total))
    if total <= seq_len:
        return [flat], 0
    blocks = total // seq_len
    kept = blocks * seq_len
    # samples whose last token lies past the kept blocks lose tokens to the dropped remainder
    truncated = int(np.count_nonzero(ends > kept))
    # clone: a view would drag the whole concatenation along whenever one block is pickled to a DataLoader worker
    return [block.clone() for block in flat[:kept].view(blocks, seq_len)], truncated  # blocks x (seq_len,)


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch from ``TokenizedDataset`` items, right-padded to the longest: ``input_ids`` with ``pad_id``,
    ``attention_mask`` with 0 and ``labels`` with -100 (the index ``torch.nn.CrossEntropyLoss`` ignores).

    Each tensor is (B, T). Raises ``DataError`` for an empty batch or a missing ``pad_id``.
    """
    if not batch:
        raise DataError("cannot collate an empty batch; check the dataset has items")
    if pad_id is None:
        raise DataError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    pad = torch.nn.utils.rnn.pad_sequence
    return {
        "input_ids": pad([item["input_ids"] for item in batch], batch_first=True, padding_value=pad_id),
        "attention_mask": pad([item["attention_mask"] for item in batch], batch_first=True, padding_value=0),
        "labels": pad([item["labels"] for item in batch], batch_first=True, padding_value=-100),
    }
