"""Results of the GPU validation, written row by row and summarized from the rows alone.

Every finished row is appended to ``results.jsonl`` in each results folder (the repository's
``benchmarks/results/<card>-<date>/`` and ``$OUT`` when that is set) and flushed to disk at once, so a run cut short
keeps every row it finished. ``summary_markdown(rows)`` rebuilds the summary table from those rows, which is how the
end of a run writes it and how ``gpu_validation.py --summarize DIR`` writes it for a run that never reached its end.

A row is a JSON object with a ``section``: ``environment`` (first), ``schedule`` (what became of each unit), ``note``,
or the part it measures (``a``, ``b``, ``c``, ``d``, ``runs``); every row carries the ``run`` it belongs to.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from autofit.units import GiB, fmt_bytes

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.md"

# Targets from the issue that asked for this validation (issue 15)
RESERVED_MEAN, RESERVED_WORST, NVML_MEAN = 0.03, 0.07, 0.05
BAND = (0.85, 0.95)  # capped cards: reserved peak as a share of the budget
PLAN_SHARE = 0.95  # plan quality: share of the grid's best tokens per second


class ResultsLog:
    """Appends rows to ``results.jsonl`` in every folder given, each flushed and synced before ``append`` returns."""

    def __init__(self, folders: Iterable[Path], *, run: str) -> None:
        self.run = run
        self.paths = []
        for folder in dict.fromkeys(Path(f) for f in folders):  # one file per folder, in the order given
            folder.mkdir(parents=True, exist_ok=True)
            self.paths.append(folder / RESULTS_FILE)

    def append(self, row: dict) -> None:
        line = json.dumps({"run": self.run, **row}, default=str) + "\n"
        for path in self.paths:
            with open(path, "a") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())

    def write_summary(self, text: str) -> None:
        for path in self.paths:
            tmp = path.with_name(SUMMARY_FILE + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path.with_name(SUMMARY_FILE))


def read_rows(folder: Path, *, run: str | None = None) -> tuple[list[dict], list[str]]:
    """The rows of one run in ``folder/results.jsonl`` (default: the last run the file holds) and every run's id.
    A last line cut off mid-write (the process was killed) is left out."""
    rows = []
    for line in (Path(folder) / RESULTS_FILE).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    runs = list(dict.fromkeys(r.get("run", "") for r in rows))
    chosen = run if run is not None else (runs[-1] if runs else "")
    return [r for r in rows if r.get("run", "") == chosen], runs


# -- the summary ------------------------------------------------------------------------------------------------------
def _size(n) -> str:
    return "-" if n is None else fmt_bytes(n)


def _pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _share(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _met(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "MISSED")


def errors(rows: Sequence[dict], what: str) -> dict:
    """Mean and worst absolute relative error of the estimate over ``rows`` for ``what`` (allocated, reserved,
    device)."""
    values = [abs(r[f"error_{what}"]) for r in rows if r.get(f"error_{what}") is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean_abs": sum(values) / len(values), "worst": max(values)}


def _section_a(rows: list[dict]) -> list[str]:
    ran = [r for r in rows if r.get("outcome") == "fits"]
    shapes = sorted({r["model"] for r in ran})
    lines = [f"## a. Estimate accuracy: {len(ran)} configurations over {len(shapes)} model shapes "
             f"({len(rows) - len(ran)} did not run)", "",
             "| memory | configurations | mean abs error | worst | target |", "|---|---|---|---|---|"]
    e = {what: errors(ran, what) for what in ("allocated", "reserved", "device")}
    targets = {"allocated": "-", "reserved": f"mean <= {RESERVED_MEAN:.0%}, worst <= {RESERVED_WORST:.0%}",
               "device": f"NVML mean <= {NVML_MEAN:.0%}"}
    for what in ("allocated", "reserved", "device"):
        if e[what]["n"]:
            lines.append(f"| {what} | {e[what]['n']} | {e[what]['mean_abs']:.2%} | {e[what]['worst']:.2%} | "
                         f"{targets[what]} |")
    res, dev = e["reserved"], e["device"]
    ok_reserved = (res["mean_abs"] <= RESERVED_MEAN and res["worst"] <= RESERVED_WORST) if res["n"] else None
    ok_nvml = dev["mean_abs"] <= NVML_MEAN if dev["n"] else None
    lines += ["", f"Targets: reserved {_met(ok_reserved)}; NVML {_met(ok_nvml)}; at least 24 configurations over at "
              f"least 5 shapes {_met(len(ran) >= 24 and len(shapes) >= 5)}.", "",
              "| model | method | ckpt | batch x len | outcome | reserved est / measured | reserved | allocated | "
              "NVML |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['batch_size']} x {r['seq_len']} | {r['outcome']} | {_size(r.get('predicted_reserved'))} / "
                     f"{_size(r.get('measured_reserved'))} | {_pct(r.get('error_reserved'))} | "
                     f"{_pct(r.get('error_allocated'))} | {_pct(r.get('error_device'))} |")
    return lines + [""]


def _oom(r: dict) -> str:
    if r.get("oom"):
        return "yes"
    return f"caught by the guard ({r['guard_events']})" if r.get("guard_events") else "no"


def _section_b(rows: list[dict]) -> list[str]:
    ran = [r for r in rows if r.get("planned")]
    oom = sum(bool(r.get("oom") or r.get("guard_events")) for r in ran)  # one the guard caught is still an OOM
    in_band = sum(BAND[0] <= r["reserved_share"] <= BAND[1] for r in ran if r.get("reserved_share") is not None)
    lines = ["## b. Plans on capped cards", "",
             "| model | card | plan | steps | OOM | reserved peak / budget | budget | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("planned"):
            plan = (f"{r['method']} {r['batch_size']}x{r['grad_accum']} s{r['seq_len']}"
                    f"{' ckpt' if r['checkpointing'] else ''}")
            lines.append(f"| {r['model']} | {r['card']} | {plan} | {r.get('steps', '-')} | {_oom(r)} | "
                         f"{_share(r.get('reserved_share'))} | {_size(r.get('budget'))} | {r.get('seconds', 0):.0f} |")
        else:
            reason = r.get("reason", "")[:80]
            lines.append(f"| {r['model']} | {r['card']} | does not fit: {reason} | - | - | - | - | - |")
    lines += ["", f"Targets: 0 OOM {_met(oom == 0 if ran else None)} ({oom} of {len(ran)}); reserved peak in "
              f"{BAND[0]:.0%}-{BAND[1]:.0%} of the budget {_met(in_band == len(ran) if ran else None)} "
              f"({in_band} of {len(ran)}).", ""]
    return lines


def _section_c(rows: list[dict]) -> list[str]:
    lines = ["## c. Plan quality under the 12 GB cap", "",
             "| model | plan | plan tokens/s | grid's best | share | best of its method | share |",
             "|---|---|---|---|---|---|---|"]
    shares = []
    for r in rows:
        if not r.get("planned"):
            lines.append(f"| {r['model']} | does not fit | - | - | - | - | - |")
            continue
        p, best, within = r["plan"], r.get("best") or {}, r.get("best_in_method") or {}
        mine = (r.get("plan_measured") or {}).get("tokens_per_second")
        if r.get("share_of_best") is not None:
            shares.append(r["share_of_best"])
        lines.append(f"| {r['model']} | {p['method']} b{p['batch_size']}{' ckpt' if p['checkpointing'] else ''} | "
                     f"{mine or 0:,.0f} | {best.get('method', '-')} b{best.get('batch_size', '-')}"
                     f"{' ckpt' if best.get('checkpointing') else ''} {best.get('tokens_per_second') or 0:,.0f} | "
                     f"{_share(r.get('share_of_best'))} | {within.get('tokens_per_second') or 0:,.0f} | "
                     f"{_share(r.get('share_of_best_in_method'))} |")
    ok = min(shares) >= PLAN_SHARE if shares else None
    return lines + ["", f"Target: the plan at least {PLAN_SHARE:.0%} of the grid's best tokens/s: {_met(ok)}.", ""]


def _section_d(rows: list[dict]) -> list[str]:
    lines = ["## d. Probe cost against the baselines", "",
             "| model | method | trials | OOM | seconds | batch | usable batch |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for run in rows:
        for r in run.get("rows", []):
            lines.append(f"| {run.get('model', '-')} | {r['method']} | {r['trials']} | {r.get('ooms', '-')} | "
                         f"{r['seconds']:.1f} | {r['batch']} | {r.get('usable_batch', '-')} |")
        met = run.get("targets_met") or {}
        verdicts.append(f"{run.get('model', '-')}: <= 3 trials {_met(met.get('trials'))}, >= 3x less time than "
                        f"doubling-then-bisect {_met(met.get('speedup'))}, batch at least as large "
                        f"{_met(met.get('batch'))}")
    return lines + [""] + [f"Targets, {v}." for v in verdicts] + [""]


def _section_fam(rows: list[dict]) -> list[str]:
    ran = [r for r in rows if r.get("outcome") == "fits"]
    lines = [f"## fam. Model families: {len(ran)} configurations of encoder-decoders and encoders", "",
             "| model | task | batch x len (target) | outcome | allocated est / measured | allocated | "
             "reserved est / measured | reserved |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('task', '?')} | {r['batch_size']} x {r['seq_len']}"
                     f"{' (' + str(r['target_len']) + ')' if r.get('target_len') else ''} | {r['outcome']} | "
                     f"{_size(r.get('predicted_allocated'))} / {_size(r.get('measured_allocated'))} | "
                     f"{_pct(r.get('error_allocated'))} | {_size(r.get('predicted_reserved'))} / "
                     f"{_size(r.get('measured_reserved'))} | {_pct(r.get('error_reserved'))} |")
    return lines + [""]


def _section_runs(rows: list[dict]) -> list[str]:
    steps = sorted({m["step"] for r in rows for m in r.get("marks", [])})
    at = " / ".join(str(s) for s in steps)
    lines = ["## Runs of varying lengths (issue 10)", "",
             f"Peaks since the model was built, after steps {at}: measured, estimated (`estimate_run`), error.", "",
             f"| model | precision | ckpt | reserved after {at} | estimated | error | peak allocated (est.) | "
             "NVML at the end (est. device total) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        est = r.get("estimate") or {}
        after = {int(k): v for k, v in (est.get("reserved_after") or {}).items()}
        marks = r.get("marks", [])
        measured = " / ".join(_size(m.get("max_reserved")) for m in marks)
        predicted = " / ".join(_size(after.get(m["step"])) for m in marks) if after else "-"
        errs = [(after[m["step"]] - m["max_reserved"]) / m["max_reserved"] for m in marks
                if m.get("max_reserved") and m["step"] in after]
        last = marks[-1] if marks else {}
        lines.append(f"| {r['model']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | {measured} | "
                     f"{predicted} | {' / '.join(_pct(e) for e in errs) or '-'} | "
                     f"{_size(last.get('max_allocated'))} ({_size(est.get('peak_allocated'))}) | "
                     f"{_size(last.get('nvml'))} ({_size(est.get('device_total'))}) |")
    if rows and not any(r.get("estimate") for r in rows):
        lines += ["", "No estimate column: `runs.estimate_run` failed for every row (see estimate_error)."]
    return lines + [""]


def _section_ranks(rows: list[dict]) -> list[str]:
    lines = ["## Several GPUs (issue 11): what DDP and FSDP2 add on a world of one", "",
             "Peak over building the model and two AdamW steps, less the plain run's, against "
             "`distributed.bucket_bytes` (DDP) and `distributed.fsdp_extra` (FSDP2: an upper bound).", "",
             "| model | layers | batch x length | plain peak | DDP measured | DDP estimated | FSDP2 measured | "
             "FSDP2 estimated | measured by |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} | {r['batch_size']} x {r['seq_len']} | {_size(r['plain_peak'])} | "
                     f"{_size(r['ddp_measured'])} | {_size(r['ddp_estimated'])} | {_size(r['fsdp_measured'])} | "
                     f"{_size(r['fsdp_estimated'])} | {r['measure']} |")
    return lines + [""]


def _section_schedule(rows: list[dict], env: dict) -> list[str]:
    ran = [r for r in rows if r["status"] == "ran"]
    failed = [r for r in rows if r["status"] == "failed"]
    skipped = [r for r in rows if r["status"] in ("skipped", "cut")]
    cut = [r for r in rows if r["status"] == "cut"]
    budget = env.get("budget_seconds")
    lines = ["## Schedule", "",
             f"Budget {'none' if budget is None else f'{budget:.0f} s'}; start-up took "
             f"{env.get('startup_seconds', 0):.0f} s; {len(ran)} units ran in "
             f"{sum(r['seconds'] or 0 for r in ran):.0f} s ({sum(r['predicted_s'] for r in ran):.0f} s predicted), "
             f"{len(failed)} failed, {len(skipped)} skipped.", ""]
    parts = list(dict.fromkeys(r["part"] for r in rows))
    lines += ["| part | ran | failed | skipped | seconds | predicted s |", "|---|---|---|---|---|---|"]
    for p in parts:
        mine = [r for r in rows if r["part"] == p]
        done = [r for r in mine if r["status"] == "ran"]
        lines.append(f"| {p} | {len(done)} | {sum(r['status'] == 'failed' for r in mine)} | "
                     f"{sum(r['status'] in ('skipped', 'cut') for r in mine)} | "
                     f"{sum(r['seconds'] or 0 for r in done):.0f} | "
                     f"{sum(r['predicted_s'] for r in done):.0f} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{r['part']} {r['unit']}" for r in skipped) + "."]
    for r in cut:
        lines.append(f"Cut: {r['part']} {r['unit']} was still running when the budget ran out.")
    for r in failed:
        lines.append(f"Failed: {r['part']} {r['unit']}: {r['error']}")
    return lines + [""]


def summary_markdown(rows: Sequence[dict], *, runs_in_file: int = 1) -> str:
    """The summary of one run's rows: schedule, then each part that has rows, then the notes."""
    env = next((r for r in rows if r.get("section") == "environment"), {})
    by = {}
    for r in rows:
        by.setdefault(r.get("section"), []).append(r)
    where = env.get("card") or "the budgeted CPU device (dry run)"
    lines = [f"# autofit on {where}, {env.get('date', '?')} (run {rows[0].get('run', '?') if rows else '?'})", "",
             f"Command: `{env.get('argv', '?')}`  ", f"Versions: {env.get('versions', '?')}  ",
             f"bitsandbytes: {env.get('bitsandbytes', '?')}; optuna: {env.get('optuna', '?')}", ""]
    if runs_in_file > 1:
        lines += [f"(results.jsonl holds {runs_in_file} runs; this is the last.)", ""]
    if by.get("schedule"):
        lines += _section_schedule(by["schedule"], env)
    for key, section in (("a", _section_a), ("b", _section_b), ("c", _section_c), ("d", _section_d),
                         ("runs", _section_runs), ("fam", _section_fam), ("ranks", _section_ranks)):
        if by.get(key):
            lines += section(by[key])
    if by.get("note"):
        lines += ["## Notes", ""] + [f"- {r['text']}" for r in by["note"]] + [""]
    return "\n".join(lines)


def plots(rows: Sequence[dict], folder: Path) -> list[str]:
    """accuracy.png (part a) and capped_runs.png (part b) in ``folder``, where matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    a = [r for r in rows if r.get("section") == "a" and r.get("outcome") == "fits" and r.get("measured_reserved")]
    if a:
        fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
        m = [r["measured_reserved"] / GiB for r in a]
        p = [r["predicted_reserved"] / GiB for r in a]
        ax.scatter(m, p, s=14)
        top = max(m + p) * 1.05
        ax.plot([0, top], [0, top], "k--", linewidth=1)
        ax.set_xlabel("measured peak reserved (GiB)")
        ax.set_ylabel("estimated peak reserved (GiB)")
        ax.set_title("estimate accuracy")
        fig.tight_layout()
        fig.savefig(Path(folder) / "accuracy.png")
        plt.close(fig)
        written.append("accuracy.png")
    b = [r for r in rows if r.get("section") == "b" and r.get("planned") and r.get("reserved_share") is not None]
    if b:
        fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
        ax.bar(range(len(b)), [100 * r["reserved_share"] for r in b],
               color=["tab:red" if r.get("oom") else "tab:blue" for r in b])
        ax.axhspan(100 * BAND[0], 100 * BAND[1], color="tab:green", alpha=0.15)
        ax.set_xticks(range(len(b)), [f"{r['model'].split('/')[-1]}\n{r['card']}" for r in b], fontsize=5,
                      rotation=90)
        ax.set_ylabel("peak reserved, % of the capped budget")
        ax.set_title("plans on capped cards (green: target band)")
        fig.tight_layout()
        fig.savefig(Path(folder) / "capped_runs.png")
        plt.close(fig)
        written.append("capped_runs.png")
    return written
