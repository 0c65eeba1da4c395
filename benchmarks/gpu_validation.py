"""Proof on real hardware: estimate accuracy, plan quality and probe cost, measured on the GPU found.

One command, four parts, results under ``benchmarks/results/<card>-<date>/`` (``results.json``, ``summary.md`` and
PNG plots):

a. Estimate accuracy over at least 24 configurations: distilgpt2, gpt2, gpt2-medium, SmolLM2-135M, TinyLlama-1.1B
   and Qwen2.5-0.5B shapes (random weights) x full bf16, LoRA and QLoRA (with bitsandbytes) x checkpointing off and
   on, at two (batch, length) points: predicted against measured peak allocated, peak reserved and NVML memory.
   Targets: mean absolute error at most 3% and worst case at most 7% on reserved memory.
b. The user guides' cards stood in for by capping the allocator (``set_per_process_memory_fraction`` at the plan's
   budget less the CUDA context): the plan for an RTX 4060 Laptop (8 GB), an RTX 3060 (12 GB) and an RTX 3080 (20 GB)
   for each model, run for 50 steps with evaluation and checkpoint saves on random token data of the model's own
   vocabulary. Targets: no out-of-memory error, and the measured reserved peak between 85% and 95% of the capped
   budget.
c. Plan quality: the plan's measured tokens per second against the best of an exhaustive grid of micro-batch x
   checkpointing x method that fits under the RTX 3060 cap. Target: at least 95% of the grid's best.
d. Probe cost against accelerate's ``find_executable_batch_size`` and a Lightning-style doubling-then-bisect search
   (``benchmarks/probe_vs_baselines.py``): trials, wall time, batch found.

    python benchmarks/gpu_validation.py                    # everything, on the card found
    python benchmarks/gpu_validation.py --parts b,c --models distilgpt2
    python benchmarks/gpu_validation.py --dry-run          # every part on the budgeted CPU device, 2-layer shapes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import gpu_common as common  # noqa: E402
from autofit import gpu, memory, model, planner, probing, training  # noqa: E402
from autofit.errors import AutofitError  # noqa: E402
from autofit.guard import guard  # noqa: E402
from autofit.units import fmt_bytes  # noqa: E402

CARDS = ["rtx4060-laptop", "rtx3060", "rtx3080-20gb"]
POINTS = [(2, 512), (8, 1024)]
DRY = dict(points=[(2, 64), (4, 128)], seq=128, steps=6, eval_steps=3)


def part_a(models, dry, card, dev):
    rows = []
    for name in models:
        spec = _spec(name, dry)
        for method in common.methods(dry):
            for checkpointing in (False, True):
                cfg = common.step_config(card, method, checkpointing, dry)
                for b, s in DRY["points"] if dry else POINTS:
                    row = common.measure(spec, cfg, dev, b, s)
                    rows.append(row)
                    print(f"a {name:<34} {method:<5} ckpt {'on ' if checkpointing else 'off'} b{b} s{s}: "
                          f"{row['outcome']} reserved {_pct(row['error_reserved'])}", flush=True)
    ran = [r for r in rows if r["outcome"] == "fits"]
    summary = {what: common.errors(ran, what) for what in ("allocated", "reserved", "device")}
    res = summary["reserved"]
    summary["targets"] = {"mean_abs_reserved_le_3pct": res.get("mean_abs", 1) <= 0.03,
                          "worst_reserved_le_7pct": res.get("worst", 1) <= 0.07,
                          "configurations_ge_24": len(ran) >= 24}
    return {"rows": rows, "summary": summary}


def _budgets(dry, spec):
    """(card name, GpuInfo) stood in for. A dry run scales "cards" to the tiny model: 3, 6 and 12 times its need."""
    if not dry:
        return [(name, gpu.resolve(name)) for name in CARDS]
    cfg = common.step_config(None, "full", False, True)
    unit = memory.simulate_point(spec, cfg, batch_size=1, seq_len=DRY["seq"]).min_reserved
    out = []
    for label, factor in (("8GB-like", 3), ("12GB-like", 6), ("20GB-like", 12)):
        total = unit * factor
        out.append((label, gpu.GpuInfo(name=f"{label} budget", key=None, total_bytes=total, free_bytes=total,
                                       used_by_others_bytes=0, compute_capability=None, bf16=False,
                                       peak_tflops_16=None, bandwidth_gbs=None, source="host")))
    return out


def _random_dataset(spec, seq_len, n):
    """Random token ids of the model's own vocabulary: the logits are as big as real text's."""
    from autofit.data import TokenizedDataset

    g = torch.Generator().manual_seed(0)
    return TokenizedDataset([torch.randint(0, spec.vocab_size, (seq_len,), generator=g) for _ in range(n)],
                            truncated=0, seq_len=seq_len, packing=True)


def run_capped(spec, plan, dev, out_dir, steps, eval_steps, dry):
    """Trains ``plan`` for ``steps`` steps with evaluation and checkpoint saves on ``dev``; returns what it saw."""
    from transformers import Trainer

    started = time.perf_counter()
    record = dict(model=spec.name, card=plan.gpu.name, method=plan.method, quantization=plan.quantization,
                  batch_size=plan.batch_size, grad_accum=plan.grad_accum, seq_len=plan.seq_len,
                  checkpointing=plan.gradient_checkpointing, budget=dev.limit_bytes or dev.budget_bytes,
                  predicted_min_reserved=plan.estimate.min_reserved)
    with dev.session():
        net = training.load_model(spec, plan, random_init=True)
        n = plan.effective_batch * (steps + 1)
        train_set, eval_set = _random_dataset(spec, plan.seq_len, n), _random_dataset(spec, plan.seq_len, 8)
        args = plan.training_arguments(str(out_dir), max_steps=steps, eval_strategy="steps", eval_steps=eval_steps,
                                       save_strategy="steps", save_steps=eval_steps, save_total_limit=1,
                                       report_to=[], disable_tqdm=True, logging_steps=max(1, steps // 5),
                                       **({"use_cpu": True} if dry else {}))
        from autofit.data import collate

        log = training.MemoryLog(out_dir / "memory_log.jsonl", tokens_per_step=plan.effective_batch * plan.seq_len)
        trainer = Trainer(model=net, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=lambda batch: collate(batch, 0), callbacks=[log])
        state = guard(trainer)
        if not dry:
            torch.cuda.reset_peak_memory_stats()
        tracker = getattr(dev, "_tracker", None) if dry else None
        try:
            trainer.train()
            record["oom"] = False
        except AutofitError as err:  # the guard gave up below batch 1
            record.update(oom=True, error=str(err))
        except torch.OutOfMemoryError as err:
            record.update(oom=True, error=str(err).splitlines()[0])
        record["guard_events"] = len(state.events)
        record["measured_reserved"] = (torch.cuda.max_memory_reserved() if not dry else tracker.peak)
        record["tokens_per_second"] = log.summary()["tokens_per_second"]
        del trainer, net
    record["seconds"] = time.perf_counter() - started
    record["reserved_share"] = record["measured_reserved"] / record["budget"]
    return record


def part_b(models, dry, out_root):
    rows = []
    for name in models:
        spec = _spec(name, dry)
        for label, card in _budgets(dry, spec):
            try:
                p = planner.plan(spec, card, probe=False, **({"seq_len": DRY["seq"]} if dry else {}))
            except AutofitError as err:
                rows.append(dict(model=name, card=label, planned=False, reason=str(err)))
                print(f"b {name:<34} {label:<15} no plan: {err}", flush=True)
                continue
            limit = p.budget_bytes - p.estimate.cuda_context
            dev = common.device(dry, limit)
            folder = out_root / "runs" / f"{name.replace('/', '--')}-{label}"
            folder.mkdir(parents=True, exist_ok=True)
            row = run_capped(spec, p, dev, folder, DRY["steps"] if dry else 50, DRY["eval_steps"] if dry else 25, dry)
            row.update(card=label, planned=True)
            rows.append(row)
            print(f"b {name:<34} {label:<15} {p.method} {p.batch_size}x{p.grad_accum} s{p.seq_len}: "
                  f"{'OOM' if row['oom'] else 'ok'}, reserved {row['reserved_share']:.1%} of {fmt_bytes(row['budget'])}",
                  flush=True)
    ran = [r for r in rows if r.get("planned")]
    summary = {"runs": len(ran), "oom": sum(r["oom"] for r in ran),
               "in_85_95": sum(0.85 <= r["reserved_share"] <= 0.95 for r in ran),
               "shares": [round(r["reserved_share"], 4) for r in ran]}
    summary["targets"] = {"no_oom": summary["oom"] == 0, "all_in_85_95": summary["in_85_95"] == len(ran)}
    return {"rows": rows, "summary": summary}


def part_c(models, dry):
    rows = []
    for name in models:
        spec = _spec(name, dry)
        label, card = _budgets(dry, spec)[1]
        try:
            p = planner.plan(spec, card, probe=False, **({"seq_len": DRY["seq"]} if dry else {}))
        except AutofitError as err:
            rows.append(dict(model=name, planned=False, reason=str(err)))
            continue
        dev = common.device(dry, p.budget_bytes - p.estimate.cuda_context)
        grid = []
        for method in common.methods(dry):
            for checkpointing in (False, True):
                cfg = replace(p.step_config, method=method, gradient_checkpointing=checkpointing,
                              quantization="4bit" if method == "qlora" else "none")
                for b in [d for d in range(1, p.effective_batch + 1) if p.effective_batch % d == 0]:
                    t = probing.run_trial(spec, cfg, dev, batch_size=b, seq_len=p.seq_len, steps=3)
                    grid.append(dict(method=method, checkpointing=checkpointing, batch_size=b, fits=t.fits,
                                     tokens_per_second=t.tokens_per_second))
                    if not t.fits:
                        break  # larger micro-batches will not fit either
        fitting = [g for g in grid if g["fits"]]
        best = max(fitting, key=lambda g: g["tokens_per_second"]) if fitting else None
        same_method = [g for g in fitting if g["method"] == p.method]
        best_in_method = max(same_method, key=lambda g: g["tokens_per_second"]) if same_method else None
        mine = next((g for g in fitting if g["method"] == p.method and g["checkpointing"] == p.gradient_checkpointing
                     and g["batch_size"] == p.batch_size), None)
        share = mine["tokens_per_second"] / best["tokens_per_second"] if mine and best else None
        share_in_method = mine["tokens_per_second"] / best_in_method["tokens_per_second"] if mine else None
        rows.append(dict(model=name, card=label, planned=True, plan=dict(method=p.method, batch_size=p.batch_size,
                         checkpointing=p.gradient_checkpointing), grid=grid, best=best, best_in_method=best_in_method,
                         plan_measured=mine, share_of_best=share, share_of_best_in_method=share_in_method))
        print(f"c {name:<34} plan {p.method} b{p.batch_size} ckpt {p.gradient_checkpointing}: "
              f"{'%.1f%%' % (100 * share) if share else 'not measured'} of the grid's best, "
              f"{'%.1f%%' % (100 * share_in_method) if share_in_method else '-'} of the best {p.method} run", flush=True)
    shares = [r["share_of_best"] for r in rows if r.get("share_of_best")]
    in_method = [r["share_of_best_in_method"] for r in rows if r.get("share_of_best_in_method")]
    # "auto" takes the strongest method that fits a useful batch, not the fastest: both comparisons are reported
    summary = {"shares": shares, "shares_within_method": in_method,
               "targets": {"all_ge_95pct": bool(shares) and min(shares) >= 0.95,
                           "all_ge_95pct_within_method": bool(in_method) and min(in_method) >= 0.95}}
    return {"rows": rows, "summary": summary}


def part_d(models, dry, out_root):
    import probe_vs_baselines

    rows = []
    for name in models[:2]:
        out = out_root / f"probe_vs_baselines-{name.replace('/', '--')}.json"
        argv = ["--json", str(out)] + ([] if dry else ["--cuda", "--model", name, "--budget", "10GiB"])
        if dry:
            argv += ["--budget", "1.5GiB"]
        probe_vs_baselines.main(argv)
        import json

        rows.append(json.loads(out.read_text()))
        if dry:
            break  # the dry run's model is the benchmark's own small shape: once is enough
    return {"runs": rows}


def _spec(name, dry):
    spec = model.resolve(name)
    return common.shrink(spec) if dry else spec


def _pct(x):
    return "n/a" if x is None else f"{x:+.2%}"


def plots(results, folder) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    rows = [r for r in results.get("a", {}).get("rows", []) if r["outcome"] == "fits"]
    if rows:
        fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
        m = [r["measured_reserved"] / 2**30 for r in rows]
        p = [r["predicted_reserved"] / 2**30 for r in rows]
        ax.scatter(m, p, s=14)
        top = max(m + p) * 1.05
        ax.plot([0, top], [0, top], "k--", linewidth=1)
        ax.set_xlabel("measured peak reserved (GiB)")
        ax.set_ylabel("estimated peak reserved (GiB)")
        ax.set_title("estimate accuracy")
        fig.tight_layout()
        fig.savefig(folder / "accuracy.png")
        plt.close(fig)
        written.append("accuracy.png")
    runs = [r for r in results.get("b", {}).get("rows", []) if r.get("planned")]
    if runs:
        fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
        labels = [f"{r['model'].split('/')[-1]}\n{r['card']}" for r in runs]
        ax.bar(range(len(runs)), [100 * r["reserved_share"] for r in runs],
               color=["tab:red" if r["oom"] else "tab:blue" for r in runs])
        ax.axhspan(85, 95, color="tab:green", alpha=0.15)
        ax.set_xticks(range(len(runs)), labels, fontsize=5, rotation=90)
        ax.set_ylabel("peak reserved, % of the capped budget")
        ax.set_title("plans on capped cards (green: target band)")
        fig.tight_layout()
        fig.savefig(folder / "capped_runs.png")
        plt.close(fig)
        written.append("capped_runs.png")
    return written


def markdown(results, env) -> str:
    lines = [f"# autofit on {env.get('card', 'the budgeted CPU device (dry run)')}, {env['date']}", "",
             f"Command: `{env['argv']}`  ", f"Versions: {env['versions']}", ""]
    if "a" in results:
        s = results["a"]["summary"]
        lines += ["## a. Estimate accuracy", "", "| total | configs | mean abs error | worst |", "|---|---|---|---|"]
        for what in ("allocated", "reserved", "device"):
            e = s[what]
            if e.get("n"):
                lines.append(f"| {what} | {e['n']} | {e['mean_abs']:.2%} | {e['worst']:.2%} |")
        lines += ["", f"Targets (reserved: mean <= 3%, worst <= 7%): {s['targets']}", ""]
    if "b" in results:
        s = results["b"]["summary"]
        lines += ["## b. Plans on capped cards", "", "| model | card | plan | OOM | reserved / budget |",
                  "|---|---|---|---|---|"]
        for r in results["b"]["rows"]:
            if r.get("planned"):
                lines.append(f"| {r['model']} | {r['card']} | {r['method']} {r['batch_size']}x{r['grad_accum']} "
                             f"s{r['seq_len']}{' ckpt' if r['checkpointing'] else ''} | {'yes' if r['oom'] else 'no'} |"
                             f" {r['reserved_share']:.1%} |")
            else:
                lines.append(f"| {r['model']} | {r['card']} | does not fit | - | - |")
        lines += ["", f"Targets (no OOM; 85-95% of the budget): {s['targets']}", ""]
    if "c" in results:
        lines += ["## c. Plan quality", "", "| model | plan | share of the grid's best | of the best run of its method |",
                  "|---|---|---|---|"]
        for r in results["c"]["rows"]:
            if r.get("planned"):
                share = f"{r['share_of_best']:.1%}" if r.get("share_of_best") else "n/a"
                within = f"{r['share_of_best_in_method']:.1%}" if r.get("share_of_best_in_method") else "n/a"
                lines.append(f"| {r['model']} | {r['plan']} | {share} | {within} |")
        lines += ["", f"Target (>= 95%): {results['c']['summary']['targets']}", ""]
    if "d" in results:
        lines += ["## d. Probe cost", "", "| method | trials | seconds | batch |", "|---|---|---|---|"]
        for run in results["d"]["runs"]:
            for r in run["rows"]:
                lines.append(f"| {r['method']} | {r['trials']} | {r['seconds']:.1f} | {r['batch']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--parts", default="a,b,c,d")
    parser.add_argument("--models", default=None, help="comma-separated (default: the six above)")
    parser.add_argument("--out", default=None, help="results folder name under benchmarks/results")
    args = parser.parse_args(argv)
    dry = common.cuda_or_dry(args)
    common.silence()
    os.environ.setdefault("AUTOFIT_CACHE", "off")  # measurements must not be scaled by earlier calibrations
    env = common.environment(dry)
    models = args.models.split(",") if args.models else common.MODELS
    folder = common.out_dir(env, args.out)
    card = common.detected_card(dry)
    results = {}
    parts = args.parts.split(",")
    if "a" in parts:
        results["a"] = part_a(models, dry, card, common.device(dry))
    if "b" in parts:
        results["b"] = part_b(models, dry, folder)
    if "c" in parts:
        results["c"] = part_c(models, dry)
    if "d" in parts:
        results["d"] = part_d(models, dry, folder)
    results["plots"] = plots(results, folder)
    common.write(folder / "results.json", {"environment": env, **results})
    (folder / "summary.md").write_text(markdown(results, env))
    print(markdown(results, env))
    print(f"# wrote {folder}/results.json, summary.md and {', '.join(results['plots']) or 'no plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
