"""Probing: real trial steps on the card confirm a plan, OOM-safe, and calibrate the estimate.

``probe(plan)`` starts from the estimate's micro-batch and brackets it: a larger micro-batch is tried only when the
estimate, calibrated by what the card has measured, puts it within 5% of the budget (DeepSpeed's autotuner tries
0.95/1.0/1.05 of its estimate), a smaller one only after an out-of-memory error, bisecting between. A trial is real:
a model of the same architecture and method with random weights (the user's model is never touched), at least two
training steps of the plan's exact step on a batch of the full length, and an evaluation forward pass; peak
statistics are reset once the model is built and read after the steps, so a passing trial measures its headroom. Each trial is an immutable
``Trial``. After an out-of-memory error everything the trial held is released and allocated memory must be back at
its level before the trial; if it is not, the next trials run in fresh processes (``isolate=True`` runs every trial
that way). When the plan leaves close alternatives (checkpointing on or off, LoRA or QLoRA), they are ranked by
measured tokens per second in an Optuna study stored beside the calibration, so an interrupted probe resumes.

Two devices run trials: ``CudaDevice`` (optionally capped with ``set_per_process_memory_fraction`` to stand in for a
smaller card) and ``BudgetedCpuDevice``, real CPU tensors under a byte budget enforced by the allocation tracker,
which lets the whole probe run for real without a GPU.

Under a process group of several ranks (a script started with ``torchrun`` or ``accelerate launch``) every rank
probes the same plan at the same time: each trial runs on all ranks and is then agreed by one collective (an
out-of-memory error on any rank is one on all, each rank having released its memory first; the largest peaks; the
slowest rank's speed), and every rank brackets against the tightest rank's limit, so all take the same next step.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch

from autofit import calibration, memory, offload, validate
from autofit import gpu as gpus
from autofit import model as models
from autofit.errors import ProbeError
from autofit.plans import Plan, Trial
from autofit.sim import kbit, simulate
from autofit.sim.simulate import StepConfig
from autofit.sim.tracker import Tracker
from autofit.units import fmt_bytes

log = logging.getLogger(__name__)

# Messages other backends use for out-of-memory errors that are not torch.OutOfMemoryError
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                 "can't allocate memory", "not enough memory", "Failed to allocate")
BRACKET = 0.05  # try sizes whose calibrated estimate is within 5% of the limit


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is running out of device memory: by type first, then by message for other backends."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MESSAGES)


# -- devices --------------------------------------------------------------------------------------------------------
class _CudaAutocast:
    @staticmethod
    def region(dtype):
        return torch.autocast("cuda", dtype=dtype)


class _CpuAutocast:
    @staticmethod
    def region(dtype):
        return torch.autocast("cpu", dtype=dtype)


@dataclass(frozen=True, kw_only=True, slots=True)
class CudaDevice:
    """A CUDA card; with ``limit_bytes`` the caching allocator is capped there (``set_per_process_memory_fraction``),
    so a large card stands in for a smaller one."""

    index: int = 0
    limit_bytes: int | None = None

    @property
    def name(self) -> str:
        return torch.cuda.get_device_name(self.index)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        if self.limit_bytes is None:
            yield
            return
        total = torch.cuda.get_device_properties(self.index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.limit_bytes / total), self.index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, self.index)

    def build(self, spec: models.ModelSpec, cfg: StepConfig) -> torch.nn.Module:
        device = f"cuda:{self.index}"
        if cfg.quantization != "none" and kbit.bitsandbytes_available():
            model = kbit.build_bnb_model(spec, cfg, device)
        else:
            model = simulate.build_model(spec, cfg, spec.num_layers, device=device)
        return model

    def autocast(self):
        return _CudaAutocast

    def reset(self) -> None:
        torch.cuda.synchronize(self.index)
        torch.cuda.reset_peak_memory_stats(self.index)

    def peaks(self) -> tuple[int, int]:
        torch.cuda.synchronize(self.index)
        return torch.cuda.max_memory_allocated(self.index), torch.cuda.max_memory_reserved(self.index)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.index)

    def used_now(self) -> int | None:
        """This process's memory on the card as NVML (and nvidia-smi) sees it, or None where NVML cannot say."""
        return gpus.process_memory(self.index)

    def outside_allocator(self, used: int | None) -> int | None:
        """Of ``used`` (NVML's view, just read), what PyTorch's caching allocator does not hold: the CUDA context,
        loaded kernels and library workspaces outside it."""
        return None if used is None else used - torch.cuda.memory_reserved(self.index)

    def settle(self) -> None:
        """Before a trial: garbage from before it (the caller's cycles holding tensors) freed and the cache emptied,
        so the baseline is what is really held."""
        self.cleanup()

    def cleanup(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.index)
        torch.cuda.empty_cache()

    def sync(self) -> None:
        torch.cuda.synchronize(self.index)

    def offload_hooks(self):
        """The saved-tensor hooks a step that offloads activations runs its forward under: torch's own."""
        return torch.autograd.graph.save_on_cpu(pin_memory=True)

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}"


@dataclass(frozen=True, kw_only=True, slots=True)
class BudgetedCpuDevice:
    """Real CPU tensors under ``budget_bytes``: the allocation tracker raises ``torch.OutOfMemoryError`` when live
    memory would pass it, as a full GPU does. Allocated and reserved are the same here (no caching allocator)."""

    budget_bytes: int

    name = "budgeted CPU device"
    limit_bytes = None
    torch_device = "cpu"

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        tracker = Tracker(budget=self.budget_bytes)
        _CPU_TRACKERS.append(tracker)
        try:
            with tracker:
                yield
        finally:
            _CPU_TRACKERS.remove(tracker)

    @property
    def _tracker(self) -> Tracker:
        if not _CPU_TRACKERS:
            raise ProbeError("the budgeted CPU device is used outside its session")
        return _CPU_TRACKERS[-1]

    def build(self, spec: models.ModelSpec, cfg: StepConfig) -> torch.nn.Module:
        return simulate.build_model(spec, cfg, spec.num_layers, device="cpu")

    def autocast(self):
        return _CpuAutocast

    def reset(self) -> None:
        self._tracker.reset_peak()

    def peaks(self) -> tuple[int, int]:
        return self._tracker.peak, self._tracker.peak

    def allocated(self) -> int:
        return self._tracker.live if _CPU_TRACKERS else 0

    def used_now(self) -> int | None:
        return None  # no device-level view of host memory beyond the tracker's own counts

    def outside_allocator(self, used: int | None) -> int | None:
        return None

    def settle(self) -> None:
        """Nothing to do before a trial: the session's tracker is new and counts nothing made before it."""

    def cleanup(self) -> None:
        gc.collect()

    def sync(self) -> None:
        pass

    def offload_hooks(self):
        """Here the device is host memory too: the offloaded copies are made out of the budget's sight, as they
        would leave a card (``simulate.OffloadedActivations``)."""
        return simulate.OffloadedActivations(self._tracker)


_CPU_TRACKERS: list[Tracker] = []


# -- one trial ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _collecting_only_new() -> Iterator[None]:
    """Within, ``gc.collect()`` walks only the objects made inside: everything older is frozen for the while
    (``gc.freeze``). A trial's garbage is its own model, optimizer and tensors, all made inside, while a full
    collection in a process that imported torch and transformers walks every object they made (0.17 s on 2 cores,
    twice a trial; ``benchmarks/trial_overhead.py``: a small LoRA trial 0.87 s with both, 0.46 s without). Where the
    process froze objects itself, nothing is frozen or thawed here and collections stay full."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_trial(spec: models.ModelSpec, cfg: StepConfig, device, *, batch_size: int, seq_len: int,
              eval_batch_size: int | None = None, steps: int = 2, number: int = 1, predicted: int = 0) -> Trial:
    """Builds a fresh model of ``spec`` as ``cfg`` trains it on ``device`` and runs ``steps`` training steps of
    ``batch_size`` x ``seq_len`` and, with ``eval_batch_size``, an evaluation forward pass. Out-of-memory errors end
    the trial as ``outcome="oom"``; any other error propagates unchanged."""
    # the simulation workers go first: idle forked workers share this process's pages copy-on-write, so each page
    # the trial writes while they live is copied first (benchmarks/trial_overhead.py, 2 cores: the first small LoRA
    # trial after a plan took 0.95 s with them alive, 0.53 s without); the next plan forks a fresh pair
    simulate._shutdown_pool()
    started = time.perf_counter()
    outcome, note, peaks, step_seconds, used, outside = "fits", "", (None, None), None, None, None
    with device.session():
        device.settle()
        baseline = device.allocated()
        with _collecting_only_new():
            try:
                step_seconds, used, outside = _trial_steps(spec, cfg, device, batch_size, seq_len, eval_batch_size,
                                                           steps)
                peaks = device.peaks()
            except BaseException as err:  # noqa: BLE001 - re-raised unless it is running out of memory
                if not is_oom(err):
                    raise
                outcome, note = "oom", str(err).splitlines()[0][:200]
                traceback.clear_frames(err.__traceback__)  # the frames hold the trial's tensors: let them go
                del err
            device.cleanup()
        returned = device.allocated() <= baseline
    tokens = batch_size * seq_len / step_seconds if step_seconds else None
    return Trial(number=number, batch_size=batch_size, seq_len=seq_len, method=cfg.method,
                 quantization=cfg.quantization, precision=cfg.precision,
                 gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer,
                 eval_batch_size=eval_batch_size, outcome=outcome, peak_allocated=peaks[0], peak_reserved=peaks[1],
                 predicted_reserved=predicted, limit_bytes=getattr(device, "limit_bytes", None) or
                 getattr(device, "budget_bytes", None), seconds=time.perf_counter() - started,
                 step_seconds=step_seconds, tokens_per_second=tokens, memory_returned=returned, isolated=False,
                 note=note, device_used=used, outside_allocator=outside)


def _trial_steps(spec, cfg, device, batch_size, seq_len, eval_batch_size, steps
                 ) -> tuple[float, int | None, int | None]:
    """The body of a trial; every tensor it makes is local, so returning or raising frees them. Returns the last
    step's seconds, the device memory in use at the end (the caching allocator still holds its peak) and how much of
    it lies outside the allocator."""
    model = device.build(spec, cfg)
    model.train()
    if cfg.gradient_checkpointing:
        simulate._enable_checkpointing(model)
    params = [p for p in models.unique_params(model) if p.requires_grad]
    if cfg.optimizer in ("paged_adamw_8bit", "adamw_cpu_offload") and device.torch_device.startswith("cuda"):
        optimizer = offload.trial_optimizer(params, cfg.optimizer)  # the library's own, where it imports
    else:
        optimizer = simulate.make_optimizer(params, cfg.optimizer) if cfg.optimizer != "adamw_8bit" else \
            _bnb_or_simulated_adam8bit(params)
    autocast = device.autocast()
    # peaks are the steps' (as the estimate's are), not loading's: reset once the model and optimizer exist
    device.reset()
    last = None
    for _ in range(steps):
        batch = simulate.spec_batch(spec, cfg, batch_size, seq_len, device=device.torch_device)
        device.sync()
        started = time.perf_counter()
        simulate.train_step(model, optimizer, params, cfg, batch, autocast,
                            offload=device.offload_hooks() if cfg.offload_activations else None)
        device.sync()
        last = time.perf_counter() - started
        del batch
    if eval_batch_size:
        model.eval()
        batch = simulate.spec_batch(spec, cfg, eval_batch_size, seq_len, device=device.torch_device)
        simulate.eval_step(model, cfg, batch, autocast)
        del batch
    used = device.used_now()
    return last, used, device.outside_allocator(used)


def _bnb_or_simulated_adam8bit(params):
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    except ImportError:
        return simulate.Adam8bit(params)


# -- subprocess isolation -----------------------------------------------------------------------------------------------
def _isolated_trial(job: dict) -> dict:
    return replace(run_trial(**job), isolated=True).to_dict()


def run_trial_isolated(spec, cfg, device, **kwargs) -> Trial:
    """``run_trial`` in a fresh process (spawned, so with its own CUDA context): nothing can leak into this one."""
    import concurrent.futures
    import multiprocessing

    job = dict(spec=replace(spec, module=None), cfg=cfg, device=device, **kwargs)
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=simulate.quiet_worker)
    try:
        result = pool.submit(_isolated_trial, job).result()
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C or SIGTERM: the trial's process goes now rather than finishing its steps
        simulate.stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True)
    return Trial.from_dict(result)


# -- the probe ------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class _Search:
    """A batch search for one configuration: the trials it ran and what it settled on."""

    cfg: StepConfig
    trials: list[Trial]
    batch_size: int  # 0: nothing fits
    tokens_per_second: float | None


class _Prober:
    def __init__(self, spec, plan, device, *, isolate, use_cache, progress, max_trials):
        self.spec, self.plan, self.device = spec, plan, device
        self.isolate, self.progress, self.max_trials = isolate, progress, max_trials
        self.trials: list[Trial] = []
        self.store = _store() if use_cache else None
        self.limit = _allocator_limit(plan, device)
        self._fast: dict[StepConfig, memory.StepModel] = {}
        self._measured: dict[tuple[StepConfig, int], int] = {}  # (config, batch) -> measured peak reserved
        self.ranks = _world_size() > 1
        if self.ranks:  # every rank takes the same decisions: the tightest rank's limit, the store on rank 0 only
            self.limit = _on_every_rank_limit(self.limit)
            if not _rank_zero():
                self.store = None

    def _key(self, cfg: StepConfig) -> calibration.Key:
        return calibration.Key.of(self.spec, self.plan.gpu.name, cfg)

    def predicted(self, cfg: StepConfig, b: int) -> int:
        """The fast model's allocator need at micro-batch ``b`` (training, or the evaluation pass if larger): what
        bracketing decides with. Its simulations are the planner's, already made."""
        if cfg not in self._fast:
            self._fast[cfg] = memory.StepModel(self.spec, cfg, seq_len=self.plan.seq_len, evaluate=True)
        sm = self._fast[cfg]
        need = sm.min_reserved(b)
        if self.plan.eval_batch_size:
            need = max(need, sm.eval_need(self.plan.eval_batch_size))
        return need

    def exact(self, cfg: StepConfig, b: int) -> int:
        """The estimate's ``min_reserved`` at exactly this shape: what a trial is compared with and calibrates."""
        return memory.simulate_point(self.spec, cfg, batch_size=b, seq_len=self.plan.seq_len,
                                     eval_batch_size=self.plan.eval_batch_size).min_reserved

    def trial(self, cfg: StepConfig, b: int) -> Trial:
        if len(self.trials) >= self.max_trials:
            raise ProbeError(f"the probe reached its limit of {self.max_trials} trials; raise max_trials")
        number = len(self.trials) + 1
        if self.progress:
            self.progress(f"trial {number}: batch {b} x {self.plan.seq_len} ({cfg.method}, checkpointing "
                          f"{'on' if cfg.gradient_checkpointing else 'off'})")
        kwargs = dict(batch_size=b, seq_len=self.plan.seq_len, eval_batch_size=self.plan.eval_batch_size,
                      number=number, predicted=self.exact(cfg, b))
        isolated = self.isolate

        def run() -> Trial:
            if isolated:
                return run_trial_isolated(self.spec, cfg, self.device, **kwargs)
            return run_trial(self.spec, cfg, self.device, **kwargs)

        result = _trial_on_every_rank(run, number) if self.ranks else run()
        if not isolated:
            if not result.memory_returned:
                log.warning("memory did not return to its level before trial %d; running the next trials in fresh "
                            "processes", number)
                self.isolate = True
        self.trials.append(result)
        if result.fits:
            self._measured[(cfg, b)] = result.peak_reserved
            if self.store is not None and result.predicted_reserved:
                self.store.record(self._key(cfg), result.peak_reserved / result.predicted_reserved)
            if self.store is not None and result.outside_allocator is not None and result.outside_allocator > 0:
                self.store.record_context(self.plan.gpu.name, calibration.context_versions(),
                                          result.outside_allocator)
        return result

    def ratio(self, cfg: StepConfig) -> float:
        """Measured over predicted memory for ``cfg`` in this probe's passing trials (the largest), else 1."""
        mine = [m / self.predicted(c, b) for (c, b), m in self._measured.items() if c == cfg]
        return max(mine) if mine else 1.0

    def search(self, cfg: StepConfig, start: int) -> _Search:
        """The largest micro-batch (a divisor of the effective batch) of ``cfg`` that runs, bracketing ``start``."""
        divisors = [d for d in range(1, self.plan.effective_batch + 1) if self.plan.effective_batch % d == 0]
        need = lambda b: self.predicted(cfg, b) * self.ratio(cfg)  # noqa: E731
        fitting = [d for d in divisors if need(d) <= self.limit]
        start = start if start in divisors and need(start) <= (1 + BRACKET) * self.limit else \
            (fitting[-1] if fitting else 1)
        mine: list[Trial] = []
        best, best_trial = 0, None
        first = self.trial(cfg, start)
        mine.append(first)
        if first.fits:
            best, best_trial = start, first
            for d in (d for d in divisors if d > start):  # upward, while the calibrated estimate allows
                if need(d) > (1 + BRACKET) * self.limit:
                    break
                t = self.trial(cfg, d)
                mine.append(t)
                if not t.fits:
                    break
                best, best_trial = d, t
        else:
            # the top of the bracket failed: bisect below it, down to where the estimate leaves a 5% margin, trying
            # the largest size first (the likeliest answer when the estimate is a little low)
            below = [d for d in divisors if d < start]
            safe = [d for d in below if need(d) <= (1 - BRACKET) * self.limit]
            candidates = below[below.index(safe[-1]):] if safe else below
            lo, hi, top_first = 0, len(candidates) - 1, True
            while lo <= hi:
                mid = hi if top_first else (lo + hi) // 2
                top_first = False
                t = self.trial(cfg, candidates[mid])
                mine.append(t)
                if t.fits:
                    best, best_trial, lo = candidates[mid], t, mid + 1
                else:
                    hi = mid - 1
            if not best:  # the estimate is off by more than the bracket: keep stepping down below it
                for d in reversed([d for d in below if candidates and d < candidates[0]]):
                    t = self.trial(cfg, d)
                    mine.append(t)
                    if t.fits:
                        best, best_trial = d, t
                        break
        return _Search(cfg=cfg, trials=mine, batch_size=best,
                       tokens_per_second=best_trial.tokens_per_second if best_trial else None)


def _store():
    return calibration.open_store()


# -- several ranks ----------------------------------------------------------------------------------------------------
def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank_zero() -> bool:
    import torch.distributed as dist

    return dist.get_rank() == 0


def _on_every_rank_limit(limit: int) -> int:
    """The smallest of the ranks' allocator limits: every rank brackets against the tightest card."""
    from autofit import collectives

    return int(-collectives.agree_max([-float(limit)])[0])


def _trial_on_every_rank(run: Callable[[], Trial], number: int) -> Trial:
    """``run()`` on this rank, then one collective that makes the trial the same on every rank: out of memory when
    any rank ran out (each has released its memory before), the largest peaks and the slowest rank's tokens per
    second when all fit, memory not returned when any rank kept some. An error other than running out of memory
    stops every rank (``ProbeError`` on the others)."""
    from autofit import collectives

    try:
        trial = run()
    except BaseException:
        collectives.agree_max([float(collectives.FAILED), 0.0, 0.0, 0.0, 0.0])
        raise
    level = collectives.RAN if trial.fits else collectives.OUT_OF_MEMORY
    agreed = collectives.agree_max([float(level), float(trial.peak_allocated or 0), float(trial.peak_reserved or 0),
                                    -float(trial.tokens_per_second or 0.0), 0.0 if trial.memory_returned else 1.0])
    level, allocated, reserved, tokens, kept = agreed
    if level == collectives.FAILED:
        raise ProbeError(f"another rank stopped with an error in trial {number}; its output says which")
    if level == collectives.OUT_OF_MEMORY:
        if trial.fits:
            trial = replace(trial, outcome="oom", note="out of memory on another rank")
        return replace(trial, memory_returned=trial.memory_returned and not kept)
    return replace(trial, peak_allocated=int(allocated), peak_reserved=int(reserved), tokens_per_second=-tokens,
                   memory_returned=not kept)


def _allocator_limit(plan, device) -> int:
    """Bytes the allocator may reserve in trials: the plan's budget less the CUDA context (measured when the card is
    here, else the estimate's assumption); the whole budget on the budgeted CPU device."""
    if isinstance(device, BudgetedCpuDevice):
        return device.budget_bytes
    if device.limit_bytes is not None:
        return device.limit_bytes
    return plan.budget_bytes - plan.estimate.cuda_context


def probe(plan, *, spec=None, device=None, isolate: bool = False, use_cache: bool = True, rank: bool = True,
          max_trials: int = 12, progress: Callable[[str], None] | None = None):
    """Confirms ``plan`` with real trials on ``device`` (default: the plan's CUDA card, capped at the plan's budget)
    and returns it marked ``probed``, with its trials, its measured headroom and, when alternatives were close, the
    configuration that measured fastest. Raises ``ProbeError`` when there is no device to probe or nothing runs."""
    validate.probe_inputs(plan, plan_type=Plan, isolate=isolate, use_cache=use_cache, rank=rank,
                          max_trials=max_trials)
    spec = models.resolve(spec if spec is not None else plan.model_name, task=None if spec is not None else plan.task,
                          target_len=None if spec is not None else plan.target_len)
    validate.plan_for_model(plan, spec)
    if device is None:
        index = plan.gpu.index
        if _world_size() > 1 and torch.cuda.is_available():
            index = torch.cuda.current_device()  # this rank's card, as torchrun or accelerate set it
        if not torch.cuda.is_available() or index is None:
            raise ProbeError("no CUDA device to probe; name the card, e.g. gpu='rtx3060', to plan from the "
                             "estimate instead")
        device = CudaDevice(index=index, limit_bytes=plan.budget_bytes - plan.estimate.cuda_context)
    prober = _Prober(spec, plan, device, isolate=isolate, use_cache=use_cache, progress=progress,
                     max_trials=max_trials)
    candidates = [(plan.step_config, plan.batch_size)] + [
        (StepConfig.from_dict(a["config"]), a["batch_size"]) for a in plan.alternatives]
    if rank and len(candidates) > 1:
        searches = _rank(prober, candidates)
    else:
        searches = [prober.search(plan.step_config, plan.batch_size)]
    fitting = [s for s in searches if s.batch_size]
    if not fitting:
        raise ProbeError(f"nothing ran on {getattr(device, 'name', 'the device')}: every trial ran out of memory, "
                         "down to a micro-batch of 1; plan for a smaller configuration (method='qlora', or a "
                         "shorter seq_len=N)")
    best = max(fitting, key=lambda s: s.tokens_per_second or 0.0)
    chosen_trial = next(t for t in best.trials if t.fits and t.batch_size == best.batch_size)
    estimate = replace(memory.simulate_point(spec, best.cfg, batch_size=best.batch_size, seq_len=plan.seq_len,
                                             eval_batch_size=plan.eval_batch_size), gpu_name=plan.gpu.name)
    limit = prober.limit
    reasons = list(plan.reasons)
    reasons.append(f"probed on {getattr(device, 'name', 'the device')} with the allocator capped at {fmt_bytes(limit)}:"
                   f" {len(prober.trials)} trial{'s' if len(prober.trials) != 1 else ''}, "
                   f"{sum(t.seconds for t in prober.trials):.1f}s")
    reasons.extend(t.line() for t in prober.trials)
    reasons.append(f"measured headroom {fmt_bytes(limit - chosen_trial.peak_reserved)} of {fmt_bytes(limit)} "
                   f"({(limit - chosen_trial.peak_reserved) / limit:.0%}) at micro-batch {best.batch_size}")
    if best.cfg != plan.step_config:
        reasons.append(f"measured fastest: {best.cfg.method}, checkpointing "
                       f"{'on' if best.cfg.gradient_checkpointing else 'off'} "
                       f"({best.tokens_per_second:,.0f} tokens/s)")
    cfg = best.cfg
    return replace(
        plan, method=cfg.method, quantization=cfg.quantization, precision=cfg.precision,
        gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer,
        batch_size=best.batch_size, grad_accum=plan.effective_batch // best.batch_size, estimate=estimate,
        tokens_per_second=best.tokens_per_second or plan.tokens_per_second, source="probed",
        reasons=tuple(reasons), trials=tuple(prober.trials), measured_reserved=chosen_trial.peak_reserved,
        # the run and the need were estimated for the plan's knobs: kept where the probe kept them
        run=plan.run if (cfg, best.batch_size) == (plan.step_config, plan.batch_size) else None,
        need_bytes=plan.need_bytes if (cfg, best.batch_size) == (plan.step_config, plan.batch_size) else None,
        # the estimate's largest micro-batch belongs to the planned configuration; another one's is not known
        largest_batch=(max(plan.largest_batch, best.batch_size)
                       if plan.largest_batch is not None and best.cfg == plan.step_config else None),
        gradient_bytes=plan.gradient_bytes if cfg.method == plan.method else None,
        trainable_params=plan.trainable_params if cfg.method == plan.method else None)


def _rank(prober: _Prober, candidates: list[tuple[StepConfig, int]]) -> list[_Search]:
    """Ranks close candidates by measured tokens per second in an Optuna study (resumable: finished candidates are
    read back from the study instead of run again). Only candidates the estimate puts under the limit are run."""
    import optuna

    allowed = [(cfg, b) for cfg, b in candidates if prober.exact(cfg, b) <= (1 + BRACKET) * prober.limit]
    description = json.dumps([[str(sorted(asdict(cfg).items())), b] for cfg, b in allowed])
    identity = f"{prober.spec.fingerprint}|{prober.plan.gpu.name}|{prober.plan.seq_len}|" \
               f"{prober.plan.effective_batch}|{description}|{calibration.versions()}"
    name = "autofit-probe-" + hashlib.sha1(identity.encode()).hexdigest()[:16]
    # several ranks keep their study in memory: a stored one could resume on one rank and not on another
    storage = optuna.storages.RDBStorage(prober.store.url) if prober.store is not None and not prober.ranks else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                sampler=optuna.samplers.GridSampler({"candidate": list(range(len(allowed)))}, seed=0))
    searches: dict[int, _Search] = {}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        i = t.params["candidate"]
        trials = [Trial.from_dict(d) for d in json.loads(t.user_attrs["trials"])]
        prober.trials.extend(replace(tr, number=len(prober.trials) + k + 1) for k, tr in enumerate(trials))
        searches[i] = _Search(cfg=allowed[i][0], trials=trials, batch_size=t.user_attrs["batch_size"],
                              tokens_per_second=t.value or None)

    def objective(trial) -> float:
        i = trial.suggest_categorical("candidate", list(range(len(allowed))))
        cfg, start = allowed[i]
        found = prober.search(cfg, start)
        searches[i] = found
        trial.set_user_attr("batch_size", found.batch_size)
        trial.set_user_attr("trials", json.dumps([t.to_dict() for t in found.trials]))
        return found.tokens_per_second or 0.0

    remaining = len(allowed) - len(searches)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
    return [searches[i] for i in sorted(searches)]
