"""The time planner of the GPU validation: units of work in priority order, their cost in seconds, and a budget that
runs what it can cover and names what it drops.

A part (a, b, c, ...) is a list of units in priority order (one configuration, one capped card, one grid). Before a
unit starts, the cost model predicts its seconds; when the time left (less a reserve kept for the summary) cannot
cover them, that unit and the rest of its part are skipped with one line naming them, and the next part is tried:
its units may be cheaper. A unit's runner may also refine its own cost once it knows more (part b knows its micro-
batch only after planning) and raise ``OverBudget``, which skips it the same way.

The cost model starts from priors (the dry run's measured timings on the CPU; stated assumptions for a GPU) and is
corrected by the units already run: predictions are scaled by measured / prior seconds, summed over the finished
units of the same kind once one has run, over all finished units before that. Nothing here imports torch, so the
planner is tested and the schedule printed without one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

NAMED = 6  # a skip line names this many units, then counts the rest (every skipped unit is also a results row)


@dataclass(frozen=True, kw_only=True, slots=True)
class Unit:
    """One indivisible piece of work: run whole or not at all."""

    part: str  # the part it belongs to, in priority order with the others ("a", "b", ..., "a-more")
    label: str  # what the skip line and the summary call it
    kind: str  # its cost class: "trial", "train", "grid", "probe", "run"
    params: int = 0  # parameters of the model each build holds
    builds: int = 1  # models built (every trial builds a fresh one)
    tokens: int = 0  # tokens trained on over the whole unit, weighted by compute per token (full, no checkpointing = 1)
    args: tuple = ()  # what the part's runner needs to run it
    note: str = ""  # said beside its cost in the schedule ("upper bound until planned")

    def __post_init__(self) -> None:
        if not self.part or not self.label or not self.kind:
            raise ValueError("a unit needs a part, a label and a kind")
        for name in ("params", "builds", "tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative; got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Costs:
    """Prior seconds of a unit: ``fixed[kind] + builds * (build + build_per_param * params)
    + per_param_token * params * tokens``, and of the start-up before the first unit."""

    startup: float
    fixed: Mapping[str, float]
    build: float
    build_per_param: float
    per_param_token: float
    source: str  # where these figures come from

    def prior(self, unit: Unit) -> float:
        if unit.kind not in self.fixed:
            raise KeyError(f"no cost prior for units of kind {unit.kind!r}; known: {', '.join(self.fixed)}")
        return (self.fixed[unit.kind] + unit.builds * (self.build + self.build_per_param * unit.params)
                + self.per_param_token * unit.params * unit.tokens)


class CostModel:
    """The priors, corrected by the measured seconds of the units already run."""

    def __init__(self, costs: Costs) -> None:
        self.costs = costs
        self._sums: dict[str, list[float]] = {}  # kind -> [prior seconds, measured seconds] of finished units

    def correction(self, kind: str) -> float:
        """Measured over prior seconds: of this kind once one has run, of every kind before that, else 1."""
        if kind in self._sums:
            prior, measured = self._sums[kind]
        else:
            prior = sum(s[0] for s in self._sums.values())
            measured = sum(s[1] for s in self._sums.values())
        return measured / prior if prior > 0 else 1.0

    def predict(self, unit: Unit) -> float:
        return self.costs.prior(unit) * self.correction(unit.kind)

    def record(self, unit: Unit, seconds: float) -> None:
        sums = self._sums.setdefault(unit.kind, [0.0, 0.0])
        sums[0] += self.costs.prior(unit)
        sums[1] += seconds


class OverBudget(Exception):
    """Raised by a runner whose refined unit no longer fits the time left: it and the rest of its part are skipped."""

    def __init__(self, unit: Unit) -> None:
        super().__init__(unit.label)
        self.unit = unit


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """What became of one unit."""

    unit: Unit
    status: str  # "ran", "failed" (an error other than running out of time), "skipped", or "cut" (by the budget)
    predicted: float  # seconds the cost model gave it when it was considered
    started: float | None = None  # seconds since the budget's start
    seconds: float | None = None  # measured, for units that ran or failed
    error: str = ""

    def to_row(self) -> dict:
        return dict(section="schedule", part=self.unit.part, unit=self.unit.label, kind=self.unit.kind,
                    status=self.status, predicted_s=round(self.predicted, 2),
                    started_s=None if self.started is None else round(self.started, 2),
                    seconds=None if self.seconds is None else round(self.seconds, 2), error=self.error)


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """``seconds`` of wall time from ``started`` (a ``clock`` reading), ``reserve`` of them kept for the summary;
    None seconds: no limit."""

    seconds: float | None
    reserve: float
    started: float
    clock: Callable[[], float] = time.monotonic

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        """Seconds units may still take."""
        if self.seconds is None:
            return float("inf")
        return self.seconds - self.reserve - self.elapsed()


@dataclass(frozen=True, kw_only=True)
class Scheduler:
    """Runs parts in priority order within a budget; ``say`` hears the skip and failure lines, ``on_outcome`` every
    outcome as it happens (so a run cut short has written what it did)."""

    budget: Budget
    costs: CostModel
    say: Callable[[str], None] = print
    on_outcome: Callable[[Outcome], None] = lambda outcome: None
    outcomes: list[Outcome] = field(default_factory=list)

    def check(self, unit: Unit) -> float:
        """The predicted seconds of ``unit``; raises ``OverBudget`` when the time left cannot cover them."""
        predicted = self.costs.predict(unit)
        if predicted > self.budget.left():
            raise OverBudget(unit)
        return predicted

    def run(self, parts: Sequence[tuple[str, Sequence[Unit]]],
            runner: Callable[[Unit], Unit | None]) -> list[Outcome]:
        """Runs every unit the budget covers, in order; returns this call's outcomes. ``runner`` returns the unit as
        it finally ran when it refined it (its cost is then learnt from that one), else None; it may raise
        ``OverBudget``; any other ``Exception`` marks the unit failed and the run goes on (``BaseException``s such
        as running out of time or an interrupt propagate)."""
        start = len(self.outcomes)
        for part, units in parts:
            for i, unit in enumerate(units):
                predicted = self.costs.predict(unit)
                if predicted > self.budget.left():
                    self._skip(part, units[i:], [predicted])
                    break
                started = self.budget.elapsed()
                try:
                    ran = runner(unit) or unit
                except OverBudget as over:
                    self._skip(part, [over.unit, *units[i + 1:]], [self.costs.predict(over.unit)])
                    break
                except Exception as err:  # noqa: BLE001 - one broken unit must not cost the rest of a short window
                    seconds = self.budget.elapsed() - started
                    message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                    self.say(f"# {part} {unit.label}: failed after {seconds:.1f} s ({message}); going on")
                    self._add(Outcome(unit=unit, status="failed", predicted=predicted, started=started,
                                      seconds=seconds, error=message))
                    continue
                seconds = self.budget.elapsed() - started
                if ran is not unit:
                    predicted = self.costs.predict(ran)
                self.costs.record(ran, seconds)
                self._add(Outcome(unit=ran, status="ran", predicted=predicted, started=started, seconds=seconds))
        return self.outcomes[start:]

    def _skip(self, part: str, units: Sequence[Unit], first_predicted: list[float]) -> None:
        predicted = first_predicted + [self.costs.predict(u) for u in units[1:]]
        left = max(0.0, self.budget.left())
        named = "; ".join(u.label for u in units[:NAMED])
        if len(units) > NAMED:
            named += f"; and {len(units) - NAMED} more"
        self.say(f"# skipped {part}: {len(units)} unit{'s' if len(units) != 1 else ''} ({named}), "
                 f"{sum(predicted):.0f} s estimated, the first {predicted[0]:.0f} s, with {left:.0f} s left")
        for unit, p in zip(units, predicted):
            self._add(Outcome(unit=unit, status="skipped", predicted=p))

    def _add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.on_outcome(outcome)


class _SimulatedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def schedule(parts: Sequence[tuple[str, Sequence[Unit]]], costs: Costs, *, seconds: float | None,
             reserve: float, startup: float | None = None) -> tuple[list[Outcome], list[str]]:
    """The schedule a run would follow if every unit took its prior: the same admission rule as ``Scheduler.run``,
    on a simulated clock that starts at ``startup`` (default: the priors' start-up). Returns the outcomes and the
    lines the run would print."""
    clock = _SimulatedClock()
    clock.now = costs.startup if startup is None else startup
    lines: list[str] = []
    model = CostModel(costs)
    scheduler = Scheduler(budget=Budget(seconds=seconds, reserve=reserve, started=0.0, clock=clock), costs=model,
                          say=lines.append)

    def pretend(unit: Unit) -> None:
        clock.now += costs.prior(unit)

    return scheduler.run(parts, pretend), lines


def format_schedule(outcomes: Sequence[Outcome], lines: Sequence[str], *, seconds: float | None, reserve: float,
                    startup: float, source: str) -> str:
    """The schedule as a table: each unit's estimated seconds and when it would end, then the skip lines."""
    budget = "no limit" if seconds is None else f"{seconds:.0f} s"
    out = [f"# schedule: budget {budget}, {reserve:.0f} s kept for the summary, start-up {startup:.0f} s "
           f"(imports, simulation workers, CUDA context); costs: {source}",
           f"{'#':>3}  {'part':<9} {'unit':<52} {'est s':>6} {'ends at s':>9}"]
    n = 0
    for o in outcomes:
        if o.status != "ran":
            continue
        n += 1
        note = f"  ({o.unit.note})" if o.unit.note else ""
        out.append(f"{n:>3}  {o.unit.part:<9} {o.unit.label:<52} {o.predicted:>6.1f} "
                   f"{o.started + o.predicted:>9.1f}{note}")
    out.extend(line.replace("# skipped", "# would skip", 1) for line in lines)  # a forecast, not the run's own lines
    ran = [o for o in outcomes if o.status == "ran"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    end = max((o.started + o.predicted for o in ran), default=startup)
    out.append(f"# planned: {len(ran)} units ending at {end:.0f} s, then the summary; skipped: {len(skipped)} units "
               f"({sum(o.predicted for o in skipped):.0f} s estimated)")
    by_part: dict[str, list[int]] = {}
    for o in outcomes:
        counts = by_part.setdefault(o.unit.part, [0, 0])
        counts[0 if o.status == "ran" else 1] += 1
    out.append("# by part (planned/skipped): " + ", ".join(f"{p} {r}/{s}" for p, (r, s) in by_part.items()))
    return "\n".join(out)
