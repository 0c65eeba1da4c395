"""Hostile input, as a new user or a careless script gives it, to the CLI and the Python API: every case ends in
autofit's own one-line error (exit status 2 from the CLI) or a stated warning, never a traceback, a hang or a silent
result. Each row names its input and the class of outcome expected, with a fragment of the message."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from autofit import calibration, data, memory, planner, probing, training, validate
from autofit import model as models
from autofit.cli import main
from autofit.errors import AutofitError, ConfigError, DataError, GpuError, ModelError
from autofit.guard import guard
from autofit.plans import Plan
from tests.conftest import tiny_gpt2, tiny_llama

# -- fixtures: files a user might point autofit at --------------------------------------------------------------------
NOTES = "\n\n".join(f"note {i}: the model learns this sentence about small cards and big models." for i in range(40))


def _config_dir(root: Path, name: str, config) -> str:
    folder = root / name
    folder.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    return str(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths of every file the table refers to, by a short key."""
    root = tmp_path_factory.mktemp("hostile")
    gpt2 = tiny_gpt2().to_dict()
    f = {"root": str(root)}
    f["gpt2"] = _config_dir(root, "tiny-gpt2", gpt2)
    for key, change in {"layers0": dict(n_layer=0), "layers-3": dict(n_layer=-3), "vocab0": dict(vocab_size=0),
                        "hidden-big": dict(n_embd="big"), "layers-float": dict(n_layer=2.5),
                        "layers-huge": dict(n_layer=10**9)}.items():
        f[key] = _config_dir(root, key, {**gpt2, **change})
    f["positions-nan"] = _config_dir(root, "positions-nan", json.dumps({**gpt2, "n_positions": 1}).replace(
        '"n_positions": 1', '"n_positions": NaN'))
    f["config-int"] = _config_dir(root, "config-int", "5")
    f["config-str"] = _config_dir(root, "config-str", '"a string"')
    f["config-list"] = _config_dir(root, "config-list", "[1, 2]")
    f["config-broken"] = _config_dir(root, "config-broken", "{not json")
    f["config-notype"] = _config_dir(root, "config-notype", {k: v for k, v in gpt2.items() if k != "model_type"})
    f["config-unknowntype"] = _config_dir(root, "config-unknowntype", {**gpt2, "model_type": "nosuchtype"})
    f["t5"] = _config_dir(root, "t5", {"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 4,
                                       "vocab_size": 256, "d_ff": 128, "d_kv": 16,
                                       "num_decoder_layers": 3})  # stacks of unequal depth
    f["bert"] = _config_dir(root, "bert", {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 256,
                                           "architectures": ["BertForMaskedLM"]})
    (root / "empty-dir").mkdir()
    f["empty-dir"] = str(root / "empty-dir")
    f["a-file"] = str(root / "a-file.txt")
    Path(f["a-file"]).write_text("I am a file")
    f["notes"] = str(root / "notes.txt")
    Path(f["notes"]).write_text(NOTES)
    f["blank.jsonl"] = str(root / "blank.jsonl")
    Path(f["blank.jsonl"]).write_text('{"text": ""}\n' * 50)
    f["spaces.txt"] = str(root / "spaces.txt")
    Path(f["spaces.txt"]).write_text("   \n\n  \t \n")
    f["nested.json"] = str(root / "nested.json")
    Path(f["nested.json"]).write_text("[" * 100_000 + "]" * 100_000)
    f["nested.jsonl"] = str(root / "nested.jsonl")
    Path(f["nested.jsonl"]).write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    f["bad.jsonl"] = str(root / "bad.jsonl")
    Path(f["bad.jsonl"]).write_text('{"text": "ok"}\n{oops\n')
    f["nofields.jsonl"] = str(root / "nofields.jsonl")
    Path(f["nofields.jsonl"]).write_text('{"question": "why"}\n')
    f["numbers.jsonl"] = str(root / "numbers.jsonl")
    Path(f["numbers.jsonl"]).write_text('{"text": 12}\n')
    f["binary.txt"] = str(root / "binary.txt")
    Path(f["binary.txt"]).write_bytes(b"\xff\xfe\x00\x80" * 100)
    f["data.csv"] = str(root / "data.csv")
    Path(f["data.csv"]).write_text("a,b\n1,2\n")
    f["missing"] = str(root / "does-not-exist.txt")
    f["finished"] = str(root / "finished")
    Path(f["finished"]).mkdir()
    (Path(f["finished"]) / "model.safetensors").write_bytes(b"weights")
    (Path(f["finished"]) / "plan.json").write_text("{}")
    f["unfinished"] = str(root / "unfinished")
    (Path(f["unfinished"]) / "checkpoint-3").mkdir(parents=True)
    # plans: a good one for the tiny GPT-2, mutated below; a LoRA plan made for a Llama
    good = planner.plan(f["gpt2"], "cpu", seq_len=32, effective_batch=4, method="full", probe=False)
    f["plan"] = good.to_dict()
    llama = planner.plan(tiny_llama(), "cpu", seq_len=32, effective_batch=4, method="lora", probe=False)
    f["llama-plan"] = _write_plan(root, "llama-plan", llama.to_json())
    f["plan-dir"] = str(root)
    return f


def _write_plan(root: Path, name: str, text: str) -> str:
    path = root / f"{name}.json"
    path.write_text(text)
    return str(path)


def plan_file(files, name: str, **changes) -> str:
    """The good plan with ``changes`` (dotted keys reach into the estimate), written as a file."""
    plan = json.loads(json.dumps(files["plan"]))
    for key, value in changes.items():
        target = plan
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return _write_plan(Path(files["root"]), name, json.dumps(plan))


# -- the CLI ---------------------------------------------------------------------------------------------------------
EST = ["estimate", "distilgpt2", "--gpu", "rtx3060", "--batch-size", "1", "--seq-len", "64"]
PROBE = ["probe", "distilgpt2", "--gpu", "rtx3060"]


def _replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def est(**flags):
    argv = list(EST)
    for flag, value in flags.items():
        flag = "--" + flag.replace("_", "-")
        argv = _replace(argv, flag, value) if flag in argv else argv + [flag] + ([value] if value is not None else [])
    return argv


def model(name):
    return ["estimate", name] + EST[2:]


# Each row: (id, argv with {key} placeholders for files, environment, fragment of the one error line).
CLI_ERRORS = [
    ("batch-0", est(batch_size="0"), {}, "batch_size must be a whole number >= 1; got 0"),
    ("batch-negative", est(batch_size="-3"), {}, "got -3"),
    ("batch-1e12", est(batch_size="1000000000000"), {}, "more than any card"),
    ("batch-text", est(batch_size="x"), {}, "invalid int value: 'x'"),
    ("batch-fraction", est(batch_size="8.5"), {}, "invalid int value: '8.5'"),
    ("seq-0", est(seq_len="0"), {}, "seq_len must be a whole number"),
    ("seq-1", est(seq_len="1"), {}, "seq_len must be a whole number in [2"),
    ("seq-beyond", est(seq_len="99999"), {}, "beyond"),
    ("seq-nan", est(seq_len="nan"), {}, "invalid int value"),
    ("seq-tokens-beyond-any-card", est(gpu="cpu", seq_len="1024", batch_size="100000000"), {}, "more than any card"),
    ("card-1e21GB", est(gpu="1000000000000000000000GB"), {}, "larger than any made"),
    ("card-1TiB", est(gpu="1TiB"), {}, "larger than any made"),
    ("card-0GB", est(gpu="0GB"), {}, "zero"),
    ("card-negative", est(gpu="-12GB"), {}, "expected one argument"),
    ("card-unknown", est(gpu="rtx9999"), {}, "unknown GPU"),
    ("card-empty", est(gpu=""), {}, "empty GPU spec"),
    ("card-cuda-text", est(gpu="cuda:x"), {}, "cuda:0"),
    ("lora-r-0", est(method="lora", lora_r="0"), {}, "lora_r must be a whole number >= 1; got 0"),
    ("lora-r-1e9", est(method="lora", lora_r="1000000000"), {}, "layers are 768 wide"),
    ("lora-r-negative", est(method="lora", lora_r="-1"), {}, "lora_r must be"),
    ("lora-r-0-full", est(lora_r="0"), {}, "lora_r must be"),
    ("full-8bit", est(quantization="8bit"), {}, "quantization 8bit contradicts it"),
    ("full-4bit", est(quantization="4bit"), {}, "quantization 4bit contradicts it"),
    ("qlora-none", est(method="qlora", quantization="none"), {}, "quantization none contradicts it"),
    ("method-magic", est(method="magic"), {}, "invalid choice: 'magic'"),
    ("precision-fp64", est(precision="fp64"), {}, "invalid choice: 'fp64'"),
    ("optimizer-sgd", est(optimizer="sgd"), {}, "invalid choice: 'sgd'"),
    ("targets-other-model", est(method="lora", lora_targets="q_proj"), {}, "do not match"),
    ("targets-empty", est(method="lora", lora_targets=","), {}, "names no module"),
    ("model-too-long", model("m" * 300), {}, "longer than a file system allows"),
    ("model-path-too-long", model("/".join(["d" * 200] * 30)), {}, "longer than"),
    ("model-empty", model(""), {}, "empty model name"),
    ("model-blank", model("   "), {}, "empty model name"),
    ("model-unknown", model("nosuchmodel"), {}, "unknown model"),
    ("config-int", model("{config-int}"), {}, "holds a JSON int"),
    ("config-str", model("{config-str}"), {}, "holds a JSON str"),
    ("config-list", model("{config-list}"), {}, "holds a JSON list"),
    ("config-broken", model("{config-broken}"), {}, "is not valid JSON"),
    ("config-no-type", model("{config-notype}"), {}, "has no model_type"),
    ("config-unknown-type", model("{config-unknowntype}"), {}, "nosuchtype"),
    ("config-layers-0", model("{layers0}"), {}, "n_layer must be a whole number"),
    ("config-layers-negative", model("{layers-3}"), {}, "got -3"),
    ("config-layers-float", model("{layers-float}"), {}, "got 2.5 (a float)"),
    ("config-layers-huge", model("{layers-huge}"), {}, "n_layer must be"),
    ("config-vocab-0", model("{vocab0}"), {}, "vocab_size must be"),
    ("config-hidden-text", model("{hidden-big}"), {}, "n_embd must be"),
    ("config-positions-nan", model("{positions-nan}"), {}, "n_positions must be"),
    ("config-t5-uneven-stacks", model("{t5}"), {}, "whose stacks have the same depth"),
    ("config-bert-as-causal-lm", model("{bert}") + ["--task", "causal-lm"], {}, "is an encoder, not a causal"),
    ("task-unknown", model("{bert}") + ["--task", "summarize"], {}, "task must be one of"),
    ("target-len-on-a-decoder", model("distilgpt2") + ["--target-len", "64"], {}, "not an encoder-decoder"),
    ("dir-without-config", model("{empty-dir}"), {}, "has no config.json"),
    ("plot-into-a-folder", est(plot="{empty-dir}"), {}, "is a folder"),
    ("plot-under-a-file", est(plot="{a-file}/mem.png"), {}, "which is a file"),
    ("workers-text", EST, {"AUTOFIT_WORKERS": "abc"}, "AUTOFIT_WORKERS must be a whole number"),
    ("workers-0", EST, {"AUTOFIT_WORKERS": "0"}, "got '0'"),
    ("workers-negative", EST, {"AUTOFIT_WORKERS": "-2"}, "AUTOFIT_WORKERS"),
    ("workers-float", EST, {"AUTOFIT_WORKERS": "1e3"}, "AUTOFIT_WORKERS"),
    ("workers-huge", EST, {"AUTOFIT_WORKERS": "100000"}, "AUTOFIT_WORKERS"),
    ("no-command-args", ["estimate"], {}, "the following arguments are required"),
    ("unknown-flag", EST + ["--batchsize", "4"], {}, "unrecognized arguments"),
    # probe: planning knobs
    ("effective-1e12", PROBE + ["--effective-batch", "1000000000000"], {}, "effective_batch must be"),
    ("effective-0", PROBE + ["--effective-batch", "0"], {}, "effective_batch must be"),
    ("effective-negative", PROBE + ["--effective-batch=-4"], {}, "got -4"),
    ("effective-fraction", PROBE + ["--effective-batch", "2.5"], {}, "a whole number of sequences or 'max'"),
    ("margin-nan", PROBE + ["--margin", "nan"], {}, "margin must be a finite number"),
    ("margin-inf", PROBE + ["--margin", "inf"], {}, "margin must be a finite number"),
    ("margin-0.7", PROBE + ["--margin", "0.7"], {}, "margin must be"),
    ("margin-negative", PROBE + ["--margin=-0.1"], {}, "margin must be"),
    ("probe-seq-beyond", PROBE + ["--seq-len", "4096"], {}, "beyond"),
    ("probe-full-8bit", PROBE + ["--method", "full", "--quantization", "8bit"], {}, "contradicts it"),
    ("probe-lora-4bit", PROBE + ["--method", "lora", "--quantization", "4bit"], {}, "contradicts it"),
    ("probe-lora-r-0", PROBE + ["--lora-r", "0"], {}, "lora_r must be"),
    ("probe-ckpt-maybe", PROBE + ["--gradient-checkpointing", "maybe"], {}, "invalid choice"),
    ("probe-out-folder", PROBE + ["--out", "{empty-dir}"], {}, "is a folder"),
    ("probe-out-under-file", PROBE + ["--out", "{a-file}/plan.json"], {}, "which is a file"),
    ("probe-data-missing", PROBE + ["--data", "{missing}"], {}, "does not exist"),
    ("probe-data-empty", PROBE + ["--data", "{spaces.txt}"], {}, "is empty"),
    ("probe-data-all-blank", PROBE + ["--data", "{blank.jsonl}"], {}, "all 50 samples are blank"),
    ("probe-data-nested-array", PROBE + ["--data", "{nested.json}"], {}, "nests JSON deeper"),
    ("probe-data-nested-record", PROBE + ["--data", "{nested.jsonl}"], {}, "nests JSON deeper"),
    ("probe-data-csv", PROBE + ["--data", "{data.csv}"], {}, "cannot read .csv"),
    ("probe-data-folder", PROBE + ["--data", "{empty-dir}"], {}, "is not a file"),
    ("probe-data-bad-line", PROBE + ["--data", "{bad.jsonl}"], {}, "line 2 is not valid JSON"),
    ("probe-data-no-fields", PROBE + ["--data", "{nofields.jsonl}"], {}, "has none of the fields"),
    ("probe-data-number-text", PROBE + ["--data", "{numbers.jsonl}"], {}, "not a string"),
    ("probe-data-binary", PROBE + ["--data", "{binary.txt}"], {}, "not UTF-8"),
    # fit
    ("fit-models-comma", ["fit", "--gpu", "rtx3060", "--models", ","], {}, "names no model"),
    ("fit-card-1e21", ["fit", "--gpu", "1000000000000000000000GB", "--models", "gpt2"], {}, "larger than any made"),
    ("fit-seq-0", ["fit", "--gpu", "rtx3060", "--models", "gpt2", "--seq-len", "0"], {}, "seq_len must be"),
    ("fit-method-magic", ["fit", "--gpu", "rtx3060", "--method", "magic"], {}, "invalid choice"),
    # inspect
    ("inspect-lora-r-0", ["inspect", "distilgpt2", "--lora-r", "0"], {}, "lora_r must be"),
    ("inspect-lora-r-huge", ["inspect", "distilgpt2", "--lora-r", "100000"], {}, "768 wide"),
    ("inspect-targets-empty", ["inspect", "distilgpt2", "--lora-targets", ","], {}, "names no module"),
    ("inspect-t5", ["inspect", "{t5}"], {}, "whose stacks have the same depth"),
    # cache
    ("cache-clear-on-a-file", ["cache", "clear"], {"AUTOFIT_CACHE": "{a-file}"}, "cannot clear the cache"),
    ("cache-bad-action", ["cache", "purge"], {}, "invalid choice"),
]

TRAIN = ["train", "{gpt2}", "--data", "{notes}", "--random-init", "--seq-len", "32", "--quiet"]


def tr(*extra, out="{root}/run"):
    return TRAIN + ["--out", out] + list(extra)


CLI_ERRORS += [
    ("steps-0", tr("--steps", "0"), {}, "steps must be a whole number in [1, 1000000000]; got 0"),
    ("steps-negative", tr("--steps=-4"), {}, "got -4"),
    ("steps-text", tr("--steps", "ten"), {}, "invalid int value"),
    ("epochs-0", tr("--epochs", "0"), {}, "epochs must be a finite number in (0"),
    ("epochs-nan", tr("--epochs", "nan"), {}, "got nan"),
    ("epochs-inf", tr("--epochs", "inf"), {}, "got inf"),
    ("epochs-negative", tr("--epochs=-1"), {}, "epochs must be"),
    ("epochs-huge", tr("--epochs", "1e9"), {}, "epochs must be"),
    ("steps-and-epochs", tr("--steps", "1", "--epochs", "1"), {}, "not allowed with argument"),
    ("lr-nan", tr("--learning-rate", "nan"), {}, "learning_rate must be a finite number"),
    ("lr-negative", tr("--learning-rate=-1"), {}, "got -1.0"),
    ("lr-0", tr("--learning-rate", "0"), {}, "learning_rate must be"),
    ("lr-5", tr("--learning-rate", "5"), {}, "learning_rate must be"),
    ("out-a-file", tr(out="{a-file}"), {}, "is a file, not a folder"),
    ("out-under-a-file", tr(out="{a-file}/run"), {}, "which is a file"),
    ("out-finished-run", tr(out="{finished}"), {}, "holds a finished run (model.safetensors); pass --overwrite"),
    ("out-unfinished-run", tr(out="{unfinished}"), {}, "holds an unfinished run (checkpoint-3); pass --overwrite"),
    ("resume-and-overwrite", tr("--resume", "--overwrite"), {}, "contradict each other"),
    ("train-data-missing", ["train", "{gpt2}", "--out", "{root}/run"], {}, "required: --data"),
    ("train-data-all-blank", ["train", "{gpt2}", "--data", "{blank.jsonl}", "--random-init", "--out", "{root}/run",
                              "--quiet"], {}, "all 50 samples are blank"),
    ("plan-a-string", tr("--plan", "{plan:string}"), {}, "holds a JSON object"),
    ("plan-not-json", tr("--plan", "{plan:notjson}"), {}, "not JSON"),
    ("plan-missing", tr("--plan", "{missing}"), {}, "cannot read the plan"),
    ("plan-a-folder", tr("--plan", "{empty-dir}"), {}, "cannot read the plan"),
    ("plan-method-magic", tr("--plan", "{plan:method=magic}"), {}, "the plan's method must be one of"),
    ("plan-other-models-targets", tr("--plan", "{llama-plan}"), {}, "are not modules of"),
    ("plan-seq-beyond", tr("--plan", "{plan:seq_len=4096,estimate.seq_len=4096}"), {}, "beyond"),
    ("plan-seq-negative", tr("--plan", "{plan:seq_len=-64}"), {}, "the plan's seq_len must be"),
    ("plan-speed-nan", tr("--plan", "{plan:tokens_per_second=nan}"), {}, "tokens_per_second must be a finite"),
    ("plan-budget-nan", tr("--plan", "{plan:budget_bytes=nan}"), {}, "budget_bytes must be a whole number"),
    ("plan-weights-nan", tr("--plan", "{plan:estimate.weights=nan}"), {}, "estimate weights must be"),
    ("plan-batch-mismatch", tr("--plan", "{plan:batch_size=3}"), {}, "must equal effective_batch"),
    ("plan-unknown-field", tr("--plan", "{plan:colour=blue}"), {}, "not a plan file autofit wrote"),
    ("plan-lora-on-full", tr("--plan", "{plan:lora_r=8}"), {}, "method is full but it sets lora_r"),
    ("plan-method-disagrees", tr("--plan", "{plan:method=lora,lora_r=8,lora_alpha=16,lora_dropout=0.0,"
                                          "lora_targets=c_attn}"), {}, "its estimate was made for 'full'"),
    ("plan-card-broken", tr("--plan", "{plan:gpu.total_bytes=-1}"), {}, "total_bytes"),
]


def _fill(files, text: str) -> str:
    """Expands ``{key}`` to a fixture path, and ``{plan:a=1,b.c=2}`` to a file of the good plan so changed."""
    if text.startswith("{plan:"):
        spec = text[len("{plan:"):-1]
        if spec in ("string", "notjson"):
            return _write_plan(Path(files["root"]), spec, '"x"' if spec == "string" else "{plan")
        changes = {}
        for item in spec.split(","):
            name, value = item.split("=")
            changes[name] = {"nan": math.nan, "c_attn": ["c_attn"]}.get(value, value)
            if isinstance(changes[name], str):
                try:
                    changes[name] = json.loads(value)  # numbers
                except ValueError:
                    pass
        return plan_file(files, f"plan-{len(list(Path(files['root']).glob('plan-*')))}", **changes)
    for key, value in files.items():
        if isinstance(value, str):
            text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("argv, env, fragment", [row[1:] for row in CLI_ERRORS], ids=[row[0] for row in CLI_ERRORS])
def test_cli_answers_hostile_input_with_one_line_and_exit_2(argv, env, fragment, files, capsys, monkeypatch):
    monkeypatch.chdir(files["root"])
    for key, value in env.items():
        monkeypatch.setenv(key, _fill(files, value))
    code = main([_fill(files, a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "", err
    assert len(lines) == 1 and lines[0].startswith("autofit: error: "), err
    assert fragment in lines[0] and "Traceback" not in err


def test_no_run_folder_was_written_by_the_refused_trains(files):
    assert not (Path(files["root"]) / "run").exists()


def test_cache_list_on_an_unusable_path_says_so_and_lists_nothing(files, capsys, monkeypatch):
    monkeypatch.setenv("AUTOFIT_CACHE", files["a-file"])
    code = main(["cache", "list"])
    out, err = capsys.readouterr()
    assert code == 0 and "not usable" in out and "0 calibrations" in out and "Traceback" not in err
    code = main(["cache", "list", "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert code == 0 and listed["usable"] is False and listed["calibrations"] == [] and "is a file" in listed["problem"]


# -- the Python API ---------------------------------------------------------------------------------------------------
def _estimate(**kwargs):
    args = dict(batch_size=1, seq_len=64, method="full")
    args.update(kwargs)
    return lambda f: memory.estimate(args.pop("model", "distilgpt2"), args.pop("gpu", "rtx3060"), **args)


def _plan(**kwargs):
    args = dict(seq_len=64, probe=False)
    args.update(kwargs)
    return lambda f: planner.plan(args.pop("model", "distilgpt2"), args.pop("gpu", "rtx3060"), **args)


def _train(data="{notes}", **kwargs):
    def run(f):
        args = dict(output_dir=f["root"] + "/api-run", random_init=True, progress=False)
        args.update(kwargs)
        return training.train(f["gpt2"], _fill(f, data) if isinstance(data, str) else data, **args)
    return run


class _FakeTokenizer:
    eos_token_id = 0


API_ERRORS = [
    ("estimate-seq-text", _estimate(seq_len="512"), ConfigError, "pass the number 512, not a string"),
    ("estimate-batch-text", _estimate(batch_size="16"), ConfigError, "batch_size must be a whole number"),
    ("estimate-batch-fraction", _estimate(batch_size=8.5), ConfigError, "got 8.5 (a float)"),
    ("estimate-seq-float", _estimate(seq_len=128.0), ConfigError, "pass 128"),
    ("estimate-batch-nan", _estimate(batch_size=math.nan), ConfigError, "got nan (a float)"),
    ("estimate-batch-bool", _estimate(batch_size=True), ConfigError, "got True (a bool)"),
    ("estimate-batch-none", _estimate(batch_size=None), ConfigError, "got None"),
    ("estimate-batch-1e12", _estimate(batch_size=10**12), ConfigError, "more than any card"),
    ("estimate-targets-str", _estimate(method="lora", lora_targets="c_attn"), ConfigError, "list of module names"),
    ("estimate-targets-ints", _estimate(method="lora", lora_targets=[1, 2]), ConfigError, "module names such as"),
    ("estimate-dropout", _estimate(method="lora", lora_dropout=1.5), ConfigError, "lora_dropout must be"),
    ("estimate-ckpt-text", _estimate(gradient_checkpointing="yes"), ConfigError, "True or False"),
    ("estimate-precision", _estimate(precision="fp8"), ConfigError, "precision must be one of"),
    ("estimate-optimizer", _estimate(optimizer="sgd"), ConfigError, "optimizer must be one of"),
    ("estimate-clip-nan", _estimate(max_grad_norm=math.nan), ConfigError, "max_grad_norm must be"),
    ("estimate-alpha-0", _estimate(method="lora", lora_alpha=0), ConfigError, "lora_alpha must be"),
    ("estimate-model-int", _estimate(model=12345), ModelError, "type int"),
    ("estimate-model-none", _estimate(model=None), ModelError, "type NoneType"),
    ("estimate-model-nul", _estimate(model="gpt2\x00x"), ModelError, "NUL"),
    ("estimate-gpu-object", _estimate(gpu=object()), GpuError, "cannot read a GPU"),
    ("estimate-gpu-bool", _estimate(gpu=True), GpuError, "cannot read a GPU"),
    ("plan-effective-text", _plan(effective_batch="16"), ConfigError, "effective_batch must be"),
    ("plan-effective-fraction", _plan(effective_batch=2.5), ConfigError, "got 2.5 (a float)"),
    ("plan-effective-1e12", _plan(effective_batch=10**12), ConfigError, "effective_batch must be"),
    ("plan-margin-inf", _plan(margin=math.inf), ConfigError, "margin must be a finite number"),
    ("plan-method-none", _plan(method=None), ConfigError, "method must be one of"),
    ("plan-lora-r-huge", _plan(lora_r=2**40), ConfigError, "lora_r must be"),
    ("plan-probe-text", _plan(probe="yes"), ConfigError, "probe must be True or False"),
    ("plan-tokenizer-object", _plan(seq_len=None, dataset=["some text"], tokenizer=object()), ConfigError,
     "tokenizer must be a transformers tokenizer"),
    ("plan-dataset-int", _plan(seq_len=None, dataset=42), DataError, "dataset (--data) must be"),
    ("plan-dataset-blank", _plan(seq_len=None, dataset=["", "  \n"]), DataError, "all 2 samples are blank"),
    ("plan-dataset-numbers", _plan(seq_len=None, dataset=[1, 2]), DataError, "sample 0 is 1 (a int)"),
    ("plan-seq-string", _plan(seq_len="64"), ConfigError, "pass the number 64"),
    ("plan-config-bert", lambda f: planner.plan(__import__("autofit.model").model.resolve(
        __import__("transformers").BertConfig(), task="causal-lm"), "rtx3060", seq_len=64),
     ConfigError, "is an encoder, not a causal"),
    ("plan-config-t5", lambda f: planner.plan(__import__("transformers").T5Config(num_decoder_layers=3), "rtx3060",
                                              seq_len=64), ModelError, "whose stacks have the same depth"),
    ("from-json-string", lambda f: Plan.from_json('"x"'), ConfigError, "holds a JSON object"),
    ("from-json-list", lambda f: Plan.from_json("[]"), ConfigError, "got a JSON list"),
    ("from-json-garbage", lambda f: Plan.from_json("not json"), ConfigError, "not JSON"),
    ("from-json-none", lambda f: Plan.from_json(None), ConfigError, "reads JSON text"),
    ("from-json-deep", lambda f: Plan.from_json("[" * 100_000), ConfigError, "not JSON"),
    ("from-dict-empty", lambda f: Plan.from_dict({}), ConfigError, "the plan has no 'model_name'"),
    ("from-dict-method", lambda f: Plan.from_dict({**f["plan"], "method": "magic"}), ConfigError,
     "method must be one of"),
    ("from-dict-seq", lambda f: Plan.from_dict({**f["plan"], "seq_len": -64}), ConfigError, "seq_len must be"),
    ("from-dict-budget-nan", lambda f: Plan.from_dict({**f["plan"], "budget_bytes": math.nan}), ConfigError,
     "budget_bytes"),
    ("train-data-none", _train(data=None), DataError, "data (--data) must be"),
    ("train-data-int", _train(data=7), DataError, "data (--data) must be"),
    ("train-data-empty-list", _train(data=[]), DataError, "has no samples"),
    ("train-plan-int", _train(plan=12345), ConfigError, "plan (--plan) must be a Plan"),
    ("train-steps-0", _train(steps=0), ConfigError, "steps must be"),
    ("train-steps-float", _train(steps=2.0), ConfigError, "pass 2"),
    ("train-epochs-nan", _train(epochs=math.nan), ConfigError, "epochs must be"),
    ("train-lr-negative", _train(learning_rate=-1), ConfigError, "learning_rate must be"),
    ("train-tokenizer-object", _train(tokenizer=object()), ConfigError, "tokenizer must be"),
    ("train-tokenizer-fake", _train(tokenizer=_FakeTokenizer()), ConfigError, "tokenizer must be"),
    ("train-out-none", _train(output_dir=None), ConfigError, "must be a folder path"),
    ("train-unknown-option", _train(batchsize=8), ConfigError, "no option 'batchsize'"),
    ("train-resume-text", _train(resume="yes"), ConfigError, "resume must be True or False"),
    ("train-save-steps-0", _train(save_steps=0), ConfigError, "save_steps must be"),
    ("guard-object", lambda f: guard(object()), ConfigError, "guard() wraps a transformers.Trainer"),
    ("guard-none", lambda f: guard(None), ConfigError, "guard() wraps"),
    ("probe-not-a-plan", lambda f: probing.probe("plan.json"), ConfigError, "probe() takes a Plan"),
    ("probe-trials-0", lambda f: probing.probe(Plan.from_dict(f["plan"]), max_trials=0), ConfigError, "max_trials"),
    ("fit-names-empty", lambda f: planner.fit_table("rtx3060", names=[]), ConfigError, "names no model"),
    ("fit-names-str", lambda f: planner.fit_table("rtx3060", names="gpt2"), ConfigError, "list of model names"),
    ("load-nested", lambda f: data.load_samples(f["nested.json"]), DataError, "nests JSON deeper"),
    ("samples-not-a-list", lambda f: validate.samples("text"), DataError, "must be a list of samples"),
    ("tokenize-object", lambda f: validate.tokenizer_object(object()), ConfigError, "tokenizer must be"),
]


@pytest.mark.parametrize("call, error, fragment", [row[1:] for row in API_ERRORS], ids=[row[0] for row in API_ERRORS])
def test_api_answers_hostile_input_with_one_line(call, error, fragment, files):
    with pytest.raises(error) as raised:
        call(files)
    message = str(raised.value)
    assert fragment in message and "\n" not in message and isinstance(raised.value, AutofitError)


def test_the_table_is_large_enough():
    assert len(CLI_ERRORS) + len(API_ERRORS) >= 100


# -- stated warnings: what was done instead ---------------------------------------------------------------------------
def test_blank_samples_are_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "some-blank.jsonl"
    path.write_text('{"text": "one"}\n{"text": ""}\n{"text": "  "}\n{"text": "two"}\n')
    with caplog.at_level(logging.WARNING):
        assert data.load_samples(path) == ["one", "two"]
    assert "dropped 2 blank sample(s) of 4 (the first is sample 1); training on the other 2" in caplog.text


def test_lora_on_a_quantized_base_is_estimated_as_qlora_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        est = memory.estimate(tiny_gpt2(), "rtx3060", batch_size=1, seq_len=32, method="lora", quantization="4bit")
    assert est.config.method == "qlora" and "estimating method qlora" in caplog.text


def test_plan_options_beside_a_plan_are_ignored_with_a_warning(files, caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        validate.train_inputs(data=files["notes"], output_dir=tmp_path / "x", plan=files["llama-plan"],
                              plan_type=Plan, steps=1, epochs=None, random_init=True, resume=False, overwrite=False,
                              tokenizer=None, packing=None, learning_rate=None, eval_steps=None, save_steps=None,
                              plan_options={"seq_len": 64}, plan_parameters=training.PLAN_OPTIONS)
    assert "seq_len=64 is ignored: the plan's knobs are used" in caplog.text


def test_a_plan_for_another_model_with_the_same_modules_applies_with_a_warning(files, caplog):
    plan = Plan.from_dict(files["plan"])
    other = models.resolve(tiny_gpt2(n_embd=128))
    with caplog.at_level(logging.WARNING):
        validate.plan_for_model(plan, other)
    assert "the plan was made for" in caplog.text


def test_an_unusable_cache_is_said_once(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    monkeypatch.setenv("AUTOFIT_CACHE", str(blocker))
    monkeypatch.setattr(calibration, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        assert calibration.open_store() is None and calibration.open_store() is None
    assert caplog.text.count("running without the calibration cache") == 1
