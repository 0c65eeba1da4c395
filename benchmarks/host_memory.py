"""Host memory of a CPU run against autofit's host estimate, and the figures autofit.host keeps as constants.

    PYTHONPATH=. python benchmarks/host_memory.py [--out benchmarks/results/cpu-2026-12-05/host_memory.txt]

Measures, each in a fresh process: the resident set after importing torch, transformers and autofit; a DataLoader
worker's private memory (USS); resident bytes per token while ``data.tokenize`` runs and after; then the peak resident
set (``ru_maxrss``) of loading a model from a saved safetensors checkpoint, tokenizing and saving it, beside
``autofit.host.estimate`` for the same run, for two models and two load dtypes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import gc, json, resource, sys, time
import psutil
def rss(): return psutil.Process().memory_info().rss
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import torch, transformers
from transformers import AutoModelForCausalLM
from autofit import data as D, host, model as models
from autofit.sim.simulate import StepConfig
args = json.loads(sys.argv[1])
out = {"imported_rss": rss()}
samples = [" ".join(f"w{(i * args['mult']) % 1499} t{(i * 7) % 1013}" for i in range(j % args["spread"] + args["least"]))
           for j in range(args["samples"])]
tok = D.build_tokenizer(samples)
if args.get("calibrate"):
    base = rss()
    ds = D.tokenize(samples, tok, seq_len=args["seq_len"], packing=False)
    tokens = sum(len(item["input_ids"]) for item in ds)
    out.update(tokens=tokens, tokenize_peak_per_token=(peak() - base) / tokens, kept_per_token=(rss() - base) / tokens)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True,
                                     collate_fn=lambda b: D.collate(b, tok.pad_token_id))
    it = iter(dl)
    for _ in range(20):
        next(it)
    time.sleep(0.5)
    out["worker_uss"] = [c.memory_full_info().uss for c in psutil.Process().children(recursive=True)]
    print(json.dumps(out)); sys.exit()
import threading
machine = host.Machine.now()
dtype = getattr(torch, args["dtype"])
# the run's peak is watched from here: building the tokenizer above (training one from the samples, which a real run
# never does) is not part of what the estimate models, and ru_maxrss cannot be reset after it
span, running = [0], [True]
def watch_span():
    while running[0]:
        span[0] = max(span[0], rss()); time.sleep(0.005)
spanner = threading.Thread(target=watch_span); spanner.start()
loading_from = rss()
net = AutoModelForCausalLM.from_pretrained(args["ckpt"], dtype=dtype, local_files_only=True)
converted = sum(p.numel() * p.element_size() for p in net.parameters()) if dtype != torch.float32 else 0
out["loading_residue"] = rss() - loading_from - converted  # what loading leaves beyond a converted copy
before, top, tokenizing = rss(), [0], [True]
def watch():  # the resident set's peak while tokenizing
    while tokenizing[0]:
        top[0] = max(top[0], rss()); time.sleep(0.005)
watcher = threading.Thread(target=watch); watcher.start()
ds = D.tokenize(samples, tok, seq_len=args["seq_len"], packing=False)
tokenizing[0] = False; watcher.join()
n = sum(len(item["input_ids"]) for item in ds)
out.update(tokenize_peak_per_token=(top[0] - before) / n, kept_per_token=(rss() - before) / n)
net.save_pretrained(args["save"])
running[0] = False; spanner.join()
out["peak_rss"] = max(span[0], rss())
out["lifetime_peak_rss"] = peak()  # with the tokenizer's building, for reference
spec = models.resolve(args["ckpt"])
cfg = StepConfig(method="full", precision="32-true" if dtype == torch.float32 else "bf16-true", device="cpu")
lengths = D.token_lengths(samples, tok)
est = host.estimate(spec, cfg, batch_size=1, seq_len=args["seq_len"], tokens=host.tokens_of(lengths, args["seq_len"]),
                    loader=host.Loader(num_workers=0, pin_memory=False), machine=machine, train=False)
out.update(estimate=est.peak_bytes, phase=est.phase, baseline=machine.process_bytes,
           tokens=sum(len(item["input_ids"]) for item in ds), estimate_tokens=host.tokens_of(lengths, args["seq_len"]))
print(json.dumps(out))
'''

BUILD = r'''
import json, sys, torch
from transformers import LlamaConfig, AutoModelForCausalLM
a = json.loads(sys.argv[1])
cfg = LlamaConfig(vocab_size=2048, hidden_size=a["hidden"], intermediate_size=a["inter"], num_hidden_layers=a["layers"],
                  num_attention_heads=a["heads"], num_key_value_heads=a["heads"], tie_word_embeddings=False)
cfg.dtype = "float32"
AutoModelForCausalLM.from_config(cfg).save_pretrained(a["dir"])
'''


def child(code: str, args: dict) -> dict:
    # a fresh process with only what it needs from this one's environment: a measurement of a resident set must not
    # depend on what ran before it in the parent (a test session, a shell's settings)
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "HF_HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(PYTHONPATH=os.environ.get("PYTHONPATH", "."), TOKENIZERS_PARALLELISM="false", AUTOFIT_CACHE="off",
               HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env,
                          timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def measure_run(workdir: str, *, hidden: int, inter: int, layers: int, heads: int, dtype: str, samples: int,
                least: int, spread: int, mult: int, seq_len: int) -> dict:
    ckpt = os.path.join(workdir, f"ckpt-{hidden}-{layers}")
    if not os.path.exists(os.path.join(ckpt, "model.safetensors")):
        child(BUILD, dict(hidden=hidden, inter=inter, layers=layers, heads=heads, dir=ckpt))
    return child(CHILD, dict(ckpt=ckpt, save=os.path.join(workdir, "saved"), dtype=dtype, samples=samples, least=least,
                             spread=spread, mult=mult, seq_len=seq_len))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = ["$ PYTHONPATH=. python benchmarks/host_memory.py" + (f" --out {args.out}" if args.out else ""), ""]
    mib = 1024 ** 2
    cal = child(CHILD, dict(calibrate=True, samples=4000, least=50, spread=300, mult=1, seq_len=512))
    lines.append(f"imported torch+transformers+autofit: resident {cal['imported_rss'] / mib:.0f} MiB")
    lines.append(f"tokenize ({cal['tokens']:,} tokens): peak {cal['tokenize_peak_per_token']:.0f} B/token, kept "
                 f"{cal['kept_per_token']:.0f} B/token")
    lines.append("DataLoader worker private memory (USS): " + ", ".join(f"{u / mib:.1f} MiB" for u in cal["worker_uss"]))
    lines.append("")
    lines.append("run (load safetensors, tokenize, save)               measured peak RSS   host estimate   estimate/measured")
    with tempfile.TemporaryDirectory() as tmp:
        for model in (dict(hidden=768, inter=2048, layers=8, heads=12), dict(hidden=1024, inter=2816, layers=6, heads=16)):
            for dtype in ("float32", "bfloat16"):
                r = measure_run(tmp, dtype=dtype, samples=3000, least=20, spread=200, mult=3, seq_len=256, **model)
                name = f"llama h{model['hidden']} x{model['layers']} in {dtype}, 3,000 samples"
                lines.append(f"{name:<52} {r['peak_rss'] / mib:>12.0f} MiB {r['estimate'] / mib:>11.0f} MiB "
                             f"{r['estimate'] / r['peak_rss']:>14.3f}   (loading left {r['loading_residue'] / mib:.0f} MiB "
                             f"beyond a converted copy; tokenizing after it: peak {r['tokenize_peak_per_token']:.0f} "
                             f"B/token, kept {r['kept_per_token']:.0f} B/token, {r['tokens']:,} tokens)")
        # out of sample (tests/test_host.py runs the same): another shape, more and longer samples
        for dtype in ("float32", "bfloat16"):
            r = measure_run(tmp, hidden=512, inter=1536, layers=10, heads=8, dtype=dtype, samples=5000, least=40,
                            spread=400, mult=5, seq_len=512)
            name = f"llama h512 x10 in {dtype}, 5,000 samples"
            lines.append(f"{name:<52} {r['peak_rss'] / mib:>12.0f} MiB {r['estimate'] / mib:>11.0f} MiB "
                         f"{r['estimate'] / r['peak_rss']:>14.3f}   (tokenizing: kept {r['kept_per_token']:.0f} "
                         f"B/token, {r['tokens']:,} tokens)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
