import json

import numpy as np
import pytest
import torch

from autofit import data
from autofit.errors import ConfigError, DataError, ModelError

TEXTS = [f"Sample {i}: the quick brown fox jumps over the lazy dog {i * i} times, then rests." for i in range(60)]
CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]


@pytest.fixture(scope="module")
def tok():
    return data.build_tokenizer(TEXTS + ["user: hi there\nassistant: hello!"], vocab_size=400)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(tmp_path, name, records):
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in records))


# -- load_samples ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["notes.txt", "notes.md", "notes"])
def test_text_paragraphs(tmp_path, name):
    path = write(tmp_path, name, "first line\nstill first\n\n\nsecond\n  \nthird\n")
    assert data.load_samples(path) == ["first line\nstill first", "second", "third"]


def test_text_lines_without_blank_lines(tmp_path):
    path = write(tmp_path, "lines.txt", "one\ntwo\r\nthree\n")
    assert data.load_samples(str(path)) == ["one", "two", "three"]


def test_jsonl_record_kinds(tmp_path):
    path = jsonl(tmp_path, "mix.jsonl", [
        {"text": "plain", "prompt": "ignored", "completion": "too"},
        {"messages": CHAT},
        {"conversations": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hey"}]},
        {"prompt": "2+2=", "completion": " 4"},
        {"prompt": "Q?", "completion": "A"},
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"instruction": "Greet.", "input": "", "output": "Hi"},
        "a bare string",
    ])
    assert data.load_samples(path) == [
        "plain",
        CHAT,
        [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hey"}],
        "2+2= 4",
        "Q?\nA",
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:\n4",
        "### Instruction:\nGreet.\n\n### Response:\nHi",
        "a bare string",
    ]


def test_json_array_and_json_lines_in_dot_json(tmp_path):
    array = write(tmp_path, "array.json", json.dumps([{"text": "a"}, {"messages": CHAT}], indent=2))
    assert data.load_samples(array) == ["a", CHAT]
    lines = jsonl(tmp_path, "lines.json", [{"text": "a"}, {"text": "b"}])
    assert data.load_samples(lines) == ["a", "b"]
    single = write(tmp_path, "one.json", json.dumps({"text": "only"}, indent=2))
    assert data.load_samples(single) == ["only"]


def test_blank_lines_and_bom_in_jsonl_are_fine(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n{"text": "b"}\n')
    assert data.load_samples(path) == ["a", "b"]


@pytest.mark.parametrize("name, body, message", [
    ("notes.jsonl", '{"text": "a"}\n{"text": "b"}\n{"txt": "c", "id": 3}\n',
     "notes.jsonl line 3 has none of the fields text, messages, conversations, prompt+completion or "
     "instruction(+input)+output (it has: id, txt); rename its fields to one of those"),
    ("notes.jsonl", '{"text": "a"}\n\n{"text": "b",}\n',
     "notes.jsonl line 3 is not valid JSON: Expecting property name enclosed in double quotes (column 14); "
     "fix or remove that line"),
    ("notes.jsonl", '{"text": 5}\n',
     "notes.jsonl line 1 field 'text' is a JSON int, not a string; make it a string"),
    ("notes.jsonl", '{"messages": [{"speaker": "me"}]}\n',
     "notes.jsonl line 1 messages message 1 has neither role+content nor from+value; "
     'write it as {"role": "user", "content": "..."}'),
    ("notes.jsonl", '{"text": "a"}\n[1, 2]\n',
     "notes.jsonl line 2 is a JSON list, not an object; give each record one of text, messages, conversations, "
     "prompt+completion or instruction(+input)+output"),
    ("data.json", '[{"text": "a"},\n {"prompt": "p"}]',
     "data.json record 2 has none of the fields text, messages, conversations, prompt+completion or "
     "instruction(+input)+output (it has: prompt); rename its fields to one of those"),
    ("data.json", '[{"text": "a"},\n {"text": }]',
     "data.json is not valid JSON: Expecting value at line 2 column 11; fix it, or write one JSON record per line"),
    ("data.json", "[]", "data.json holds an empty JSON array; put one record per sample in it"),
    ("empty.jsonl", "\n  \n", "empty.jsonl is empty; put one sample per record (or per paragraph) in it"),
    ("empty.txt", "", "empty.txt is empty; put one sample per record (or per paragraph) in it"),
    ("table.csv", "a,b\n", "cannot read .csv files (table.csv); convert it to .jsonl, .json or .txt"),
])
def test_bad_files_raise_one_line(tmp_path, name, body, message):
    path = write(tmp_path, name, body)
    with pytest.raises(DataError) as err:
        data.load_samples(path)
    assert str(err.value) == message


def test_missing_file_and_bad_encoding(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope.jsonl does not exist; pass a .jsonl, .json or .txt file$"):
        data.load_samples(missing)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"^latin.txt is not UTF-8 text .*; save it as UTF-8$"):
        data.load_samples(latin)


# -- render ------------------------------------------------------------------------------------------------------------
def test_render_plain_and_templated(tok):
    assert data.render("as is", tok) == "as is"
    assert data.render(CHAT) == "user: hi there\nassistant: hello!"
    assert data.render(CHAT, tok) == "user: hi there\nassistant: hello!"  # no chat template
    templated = data.build_tokenizer(TEXTS, vocab_size=400)
    templated.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    assert data.render(CHAT, templated) == "<s>user: hi there</s><s>assistant: hello!</s>"
    with pytest.raises(DataError, match="a sample must be a string or a list"):
        data.render(42)


# -- tokenizers --------------------------------------------------------------------------------------------------------
def test_build_tokenizer_round_trips_and_is_deterministic(tok):
    for text in TEXTS[:5] + ["unseen wörds ✓ with émoji 🦊\n\ttabs"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.eos_token_id not in ids  # adds no special tokens; tokenize appends the EOS
    again = data.build_tokenizer(TEXTS + ["user: hi there\nassistant: hello!"], vocab_size=400)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(tok) == 400
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("</s>", "<pad>", "<s>", "<unk>")
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id}) == 4


def test_build_tokenizer_rejects_bad_input():
    with pytest.raises(DataError):
        data.build_tokenizer([])
    with pytest.raises(ConfigError, match="vocab_size must be at least 260"):
        data.build_tokenizer(["x"], vocab_size=100)


def test_load_tokenizer(tmp_path, tok):
    assert data.load_tokenizer("nobody-here/no-such-model-xyz") is None
    assert data.load_tokenizer("not a repo id!") is None
    assert data.load_tokenizer(tmp_path) is None  # a directory without tokenizer files
    tok.save_pretrained(tmp_path / "saved")
    loaded = data.load_tokenizer(tmp_path / "saved")
    assert loaded(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]
    assert loaded.eos_token == "</s>" and loaded.pad_token == "<pad>"
    assert data.load_tokenizer(str(tmp_path / "saved" / "tokenizer.json")) is not None  # a file in the directory
    assert data.load_tokenizer(tok) is tok
    with pytest.raises(ModelError):
        data.load_tokenizer(3.5)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="^cannot load the tokenizer in .*broken: .*; fix or remove its tokenizer"):
        data.load_tokenizer(tmp_path / "broken")


# -- token_lengths -----------------------------------------------------------------------------------------------------
def test_token_lengths_match_one_by_one(tok):
    samples = TEXTS + [CHAT, ""]
    lengths = data.token_lengths(samples, tok)
    assert lengths.dtype == np.int64
    assert lengths.tolist() == [len(tok(data.render(s))["input_ids"]) for s in samples]


def test_token_lengths_count_special_tokens_once(tok):
    from tokenizers import processors

    bos = data.build_tokenizer(TEXTS, vocab_size=400)
    bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos.bos_token_id)])
    assert data.token_lengths(["Sample"], bos)[0] == len(tok("Sample")["input_ids"]) + 1  # the tokenizer adds a BOS
    bos.chat_template = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}"
    templated = data.render(CHAT, bos)
    # the template wrote its BOS; the tokenizer adds no second one
    assert data.token_lengths([CHAT], bos)[0] == len(bos(templated, add_special_tokens=False)["input_ids"])


# -- choose_seq_len ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths, kwargs, expected", [
    # 1..100: the 95th percentile is 95, rounded up to 128, which fits every sample
    (np.arange(1, 101), {}, data.SeqChoice(seq_len=128, percentile=95.0, percentile_tokens=95, truncated_share=0.0,
                                           max_tokens=100, samples=100)),
    (np.arange(1, 201), {}, data.SeqChoice(seq_len=192, percentile=95.0, percentile_tokens=190,
                                           truncated_share=0.04, max_tokens=200, samples=200)),
    # exactly a multiple stays
    (np.array([64] * 19 + [1000]), {}, data.SeqChoice(seq_len=64, percentile=95.0, percentile_tokens=64,
                                                       truncated_share=0.05, max_tokens=1000, samples=20)),
    # one past a multiple goes up a whole step
    (np.array([65] * 20), {}, data.SeqChoice(seq_len=128, percentile=95.0, percentile_tokens=65,
                                             truncated_share=0.0, max_tokens=65, samples=20)),
    # the minimum
    (np.array([3, 5, 9, 10]), {}, data.SeqChoice(seq_len=64, percentile=95.0, percentile_tokens=10,
                                                  truncated_share=0.0, max_tokens=10, samples=4)),
    (np.array([3, 5, 9, 10]), {"minimum": 8, "multiple": 8},
     data.SeqChoice(seq_len=16, percentile=95.0, percentile_tokens=10, truncated_share=0.0, max_tokens=10, samples=4)),
    # capped at max_positions, used as is although not a multiple
    (np.arange(1, 1001), {"max_positions": 900}, data.SeqChoice(seq_len=900, percentile=95.0, percentile_tokens=950,
                                                               truncated_share=0.1, max_tokens=1000, samples=1000)),
    (np.array([10, 20, 30, 40]), {"max_positions": 32}, data.SeqChoice(
        seq_len=32, percentile=95.0, percentile_tokens=40, truncated_share=0.25, max_tokens=40, samples=4)),
    (np.array([10, 20, 30, 40]), {"percentile": 50.0, "multiple": 16, "minimum": 1}, data.SeqChoice(
        seq_len=32, percentile=50.0, percentile_tokens=20, truncated_share=0.25, max_tokens=40, samples=4)),
])
def test_choose_seq_len(lengths, kwargs, expected):
    kwargs.setdefault("max_positions", None)
    assert data.choose_seq_len(lengths, **kwargs) == expected


def test_truncated_share_is_exact():
    assert data.truncated_share([1, 2, 3, 4, 5, 6, 7], 4) == 3 / 7
    assert data.truncated_share(np.array([5, 5]), 5) == 0.0
    with pytest.raises(DataError):
        data.truncated_share([], 4)


@pytest.mark.parametrize("kwargs", [{"percentile": 101.0}, {"multiple": 0}, {"max_positions": 0}])
def test_choose_seq_len_rejects_bad_knobs(kwargs):
    kwargs.setdefault("max_positions", None)
    with pytest.raises(ConfigError):
        data.choose_seq_len([1, 2, 3], **kwargs)


def test_seq_choice_validates():
    with pytest.raises(ValueError, match="truncated_share"):
        data.SeqChoice(seq_len=64, percentile=95.0, percentile_tokens=10, truncated_share=1.5, max_tokens=10,
                       samples=1)


# -- tokenize and collate ----------------------------------------------------------------------------------------------
def test_tokenize_unpacked_truncates_and_counts(tok):
    rows = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    seq_len = int(np.median([len(r) for r in rows]))
    ds = data.tokenize(TEXTS, tok, seq_len=seq_len, packing=False)
    assert len(ds) == len(TEXTS)
    assert ds.truncated == sum(len(r) > seq_len for r in rows) > 0
    assert ds.lengths.tolist() == [min(len(r), seq_len) for r in rows]
    for item, row in zip(ds, rows):
        assert item["input_ids"].dtype == torch.long and item["input_ids"].dim() == 1
        assert item["input_ids"].tolist() == row[:seq_len]
        assert torch.equal(item["labels"], item["input_ids"])
        assert item["attention_mask"].tolist() == [1] * len(item["input_ids"])


def test_tokenize_packed_blocks_are_exact(tok):
    rows = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    flat = [t for r in rows for t in r]
    seq_len = 50
    ds = data.tokenize(TEXTS, tok, seq_len=seq_len, packing=True)
    assert len(ds) == len(flat) // seq_len
    assert set(ds.lengths.tolist()) == {seq_len}
    packed = [t for item in ds for t in item["input_ids"].tolist()]
    assert packed == flat[:len(ds) * seq_len]  # everything kept but the remainder, in order, EOS between samples
    assert all(item["attention_mask"].all() for item in ds)
    kept, ends = len(packed), np.cumsum([len(r) for r in rows])
    assert ds.truncated == int((ends > kept).sum())


def test_tokenize_packed_short_data_keeps_its_only_block(tok):
    ds = data.tokenize(["a b", "c"], tok, seq_len=512, packing=True)
    assert len(ds) == 1 and ds.truncated == 0
    assert ds[0]["input_ids"].tolist() == tok("a b")["input_ids"] + [tok.eos_token_id] + tok("c")["input_ids"] + [
        tok.eos_token_id]


def test_tokenize_rejects(tok):
    with pytest.raises(DataError, match="seq_len must be at least 2"):
        data.tokenize(TEXTS, tok, seq_len=1, packing=False)
    with pytest.raises(DataError, match="no tokens left"):
        data.tokenize([], tok, seq_len=8, packing=True)


def test_collate_pads_right():
    batch = [
        {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
         "labels": torch.tensor([5, 6, 7])},
        {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long),
         "labels": torch.tensor([8])},
    ]
    out = data.collate(batch, pad_id=1)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


def test_dataset_feeds_a_dataloader(tok):
    ds = data.tokenize(TEXTS[:10], tok, seq_len=32, packing=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=lambda b: data.collate(b, tok.pad_token_id))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert sum(int(b["attention_mask"].sum()) for b in batches) == int(ds.lengths.sum())
