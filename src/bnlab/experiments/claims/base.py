"""What a claim is, how its arms are trained, and what a verdict is made of.

A :class:`Claim` pairs a statement from the seeds with a protocol (quick and
full), a statistic, a **verdict rule fixed in code before any run**, and the
published number or figure it should be compared with. Running it trains its
*arms* (one model configuration each, over several seeds) through the run
store, so an arm shared by two claims, or by a rerun, is trained once.

A claim returns data only: its numbers, and its figures as :func:`figure` specs (a plot kind and
the series to draw); the interface layer (:mod:`bnlab.report`) draws them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from bnlab._json import dumps
from bnlab.data import Dataset, load_dataset
from bnlab.experiments.common import summarise_group
from bnlab.models import ModelSpec
from bnlab.stats import Interval
from bnlab.store import RunStore
from bnlab.train import TrainConfig, run_group
from bnlab.train.runner import code_version, finished_group, record_detached, start_state, train_detached

__all__ = ["Claim", "ClaimContext", "ClaimResult", "Arm", "VERDICTS", "Rule", "Criterion", "figure"]

VERDICTS = ("supported", "not supported", "inconclusive")


@dataclass(frozen=True)
class Arm:
    """One configuration trained on every seed of a claim."""

    label: str
    spec: ModelSpec
    cfg: TrainConfig


@dataclass
class ClaimContext:
    """Everything a claim's run needs from outside."""

    store: RunStore
    quick: bool
    seeds: int
    out_dir: Path  # plots go here
    progress: bool = True
    datasets: dict[str, Dataset] = field(default_factory=dict)  # injected in tests; loaded lazily otherwise
    data_orders: set[str] = field(default_factory=set)  # of the arms trained so far
    arms_done: int = 0  # arms trained or reused by the claim running now
    arm_seconds: float = 0.0  # the store's training wall time of those arms (reused ones included)
    fetch: bool = False  # fetch a dataset missing from the cache (bnlab.data.fetch_dataset), as the command does
    # where arms train: None here, one after another; a RayExecutor (``claims run --ray``): the arms of a
    # train_all call not in the store yet as parallel tasks, recorded by this process as each finishes
    executor: object | None = None
    _remote_seconds: dict[str, float] = field(default_factory=dict)  # group label -> task time, this run

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            self.datasets[name] = load_dataset(name, allow_download=self.fetch, allow_registry=self.fetch)
        return self.datasets[name]

    def train(self, claim: str, arm: Arm, probes: tuple = (), start_from=None) -> dict:
        """Train (or reuse) ``arm`` on seeds 0..seeds-1; return :func:`summarise_group`'s summary.

        ``probes`` add metric series (see :mod:`bnlab.probes`). They never change the training, so
        they are not part of the arm's identity: a finished arm is reused with the series it was
        first trained with, and a claim that needs probe series should name its arms uniquely.
        ``start_from`` (:class:`bnlab.train.runner.StartFrom`) fine-tunes another group's models.
        """
        if self.executor is not None:
            self._train_remotely(claim, [(arm, probes, start_from)])
        started = time.perf_counter()
        label = f"claim:{claim}/{arm.label}"
        result = run_group(self.store, label, arm.spec, arm.cfg, list(range(self.seeds)),
                           dataset=self.dataset(arm.cfg.dataset), probes=probes, progress=self.progress,
                           start_from=start_from)
        self.data_orders.add(self.store.run(result.run_ids[0]).config["train"]["data_order"])
        self.arms_done += 1
        self.arm_seconds += result.wall_seconds or 0.0
        if self.progress:
            if label in self._remote_seconds:  # said once: a later claim sharing the arm reuses it
                how = f"trained as a Ray task in {self._remote_seconds.pop(label):.0f} s"
            else:
                how = "reused from the store" if result.reused else f"trained in {time.perf_counter() - started:.0f} s"
            tqdm.write(f"  {claim}: arm {self.arms_done} ({arm.label}, {self.seeds} seeds) {how}")
        return {**summarise_group(self.store, result, all_series=True), "label": arm.label}

    def train_all(self, claim: str, arms: dict, probes: dict | None = None) -> dict:
        """:meth:`train` for several independent arms: ``{key: summary}`` for ``{key: Arm}``, with
        ``probes`` as ``{key: tuple of probes}``. With an executor the arms not in the store yet train
        at once, one task each; without one, one after another, as :meth:`train` alone would."""
        probes = probes or {}
        if self.executor is not None:
            self._train_remotely(claim, [(arm, probes.get(key, ()), None) for key, arm in arms.items()])
        return {key: self.train(claim, arm, probes=probes.get(key, ())) for key, arm in arms.items()}

    def _train_remotely(self, claim: str, requests: list[tuple]) -> None:
        """Train the ``(arm, probes, start_from)`` requests not in the store yet as executor tasks, and
        record each in the store as it finishes (so an interrupted run keeps what finished)."""
        seeds = list(range(self.seeds))
        todo = [(f"claim:{claim}/{arm.label}", arm, probes, start_from) for arm, probes, start_from in requests
                if finished_group(self.store, f"claim:{claim}/{arm.label}", arm.spec, arm.cfg, seeds,
                                  start_from) is None]
        if not todo:
            return
        calls, per_call = [], []
        for label, arm, probes, start_from in todo:
            start = None
            if start_from is not None:
                start = (start_state(self.store, start_from, label, arm.spec, seeds), start_from.prepare)
            calls.append((label, arm.spec.to_dict(), arm.cfg.to_dict(), seeds))
            per_call.append({"dataset": self.dataset(arm.cfg.dataset), "probes": tuple(probes), "start": start})
        if self.progress:
            tqdm.write(f"  {claim}: {len(todo)} arm(s) sent as Ray tasks: {', '.join(t[1].label for t in todo)}")
        for index, result in self.executor.as_completed(train_detached, calls, shared={"threads": 1},
                                                        per_call=per_call):
            label, arm, _, start_from = todo[index]
            record_detached(self.store, arm.spec, arm.cfg, seeds, result, start_from)
            self._remote_seconds[label] = result["wall_seconds"]

    def result(self, claim: str, protocol_text: str, statistic: str, numbers: dict, runs: dict[str, list[str]],
               figures: list[dict]) -> ClaimResult:
        """The :class:`ClaimResult` of a run under this context, to be judged by :meth:`Claim.execute`."""
        return ClaimResult(claim, self.protocol_name, protocol_text, self.seeds, statistic, numbers, None, None, [],
                           runs, 0.0, figures=figures)

    def figure(self, name: str, kind: str, **args) -> dict:
        """A figure of this run: ``kind`` names a plot of :mod:`bnlab.report.plots`, ``args`` its data.
        The file is named by protocol, so a quick run never overwrites a full one."""
        return figure(f"{name}.{self.protocol_name}.png", kind, **args)

    @property
    def protocol_name(self) -> str:
        return "quick" if self.quick else "full"


@dataclass
class ClaimResult:
    claim: str
    protocol: str  # "quick" or "full"
    protocol_text: str  # what exactly was run
    seeds: int
    statistic: str  # what the numbers measure
    numbers: dict  # the statistic per condition, with CIs
    verdict: str | None  # None until Claim.execute judges the numbers by the claim's rule
    reason: str | None  # the rule applied to these numbers, in words
    plots: list[str]  # image files drawn by results stored before figures were data; new results: []
    runs: dict[str, list[str]]  # arm label -> run ids
    wall_seconds: float
    code_version: str = field(default_factory=code_version)
    # "per_seed" when every arm gave each seed its own batch order; "shared" when all seeds saw the
    # same batches, so the CIs cover initialization only (every result made before 2026-12-02)
    data_order: str = "shared"
    # what the stored result said, when the rule as written now judges its numbers differently
    earlier_verdict: str | None = None
    # what to draw: figure() specs, drawn by bnlab.report (file name, plot kind, data)
    figures: list[dict] = field(default_factory=list)
    finished: str = ""  # when the run ended, UTC, "YYYY-MM-DD HH:MM" ("" in results stored before)
    # the training wall time of the claim's arms as the store recorded it when they trained (an arm shared
    # with another claim counts in both): what a rerun that reuses every arm does not measure again
    arm_seconds: float = 0.0

    def __post_init__(self):
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.claim}.{self.protocol}.json"
        path.write_text(dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> ClaimResult:
        return cls(**json.loads(path.read_text()))


@dataclass(frozen=True)
class Claim:
    """A statement from the seeds, made testable.

    Attributes:
        name: the id used on the command line (``bnlab claims run NAME``).
        number: its number in the claims list.
        title: one line.
        seed_wording: what the seeds say, briefly quoted, with the seed number.
        verdict_rule: the verdict rule (:class:`Rule`), stated before any run; ``rule`` is its text.
        anchor: the published number or figure to set ours against.
        run: ``run(ctx) -> ClaimResult``.
        follows: for a follow-up experiment, the name of the claim whose result it explains.
        ours_vs_anchor: ``numbers -> str``: our number in the anchor's units, beside it (None: no
            published number to set it against).
    """

    name: str
    number: int
    title: str
    seed_wording: str
    verdict_rule: Rule
    anchor: str
    run: Callable[[ClaimContext], ClaimResult]
    follows: str | None = None
    ours_vs_anchor: Callable[[dict], str] | None = None

    @property
    def rule(self) -> str:
        """The verdict rule in words, made from :attr:`verdict_rule`."""
        return self.verdict_rule.text

    def rejudge(self, result: ClaimResult) -> ClaimResult:
        """``result`` judged again from its numbers by the rule as written now (results stored by an
        earlier bnlab may have been judged by code that disagreed with the printed rule); if the
        verdict changes, ``earlier_verdict`` keeps the stored one."""
        try:
            verdict, reason = self.verdict_rule.judge(result.numbers)
        except (KeyError, TypeError, ValueError):
            return result  # numbers without this rule's intervals (another layout): as stored
        if verdict == result.verdict:
            return dataclasses.replace(result, reason=reason)
        return dataclasses.replace(result, verdict=verdict, reason=reason, earlier_verdict=result.verdict)

    def execute(self, ctx: ClaimContext) -> ClaimResult:
        started = time.perf_counter()
        ctx.data_orders.clear()
        ctx.arms_done, ctx.arm_seconds = 0, 0.0
        result = self.run(ctx)
        result.verdict, result.reason = self.verdict_rule.judge(result.numbers)
        result.wall_seconds = time.perf_counter() - started
        result.finished = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        result.arm_seconds = ctx.arm_seconds
        result.data_order = "per_seed" if ctx.data_orders == {"per_seed"} else "shared"
        result.save(ctx.store.path.parent / "claims")
        return result


@dataclass(frozen=True)
class Criterion:
    """One effect, measured as a 95% Welch interval and held against a margin fixed before any run.

    ``kind="exceeds"``: supported if the interval lies above ``+margin``; not supported if it lies
    below ``+margin`` (the effect is smaller than the margin, whatever its sign); inconclusive if it
    straddles ``+margin``. ``kind="within"``: supported if the interval lies inside
    ``(-margin, +margin)``; not supported if it lies entirely outside that band; inconclusive if it
    straddles an edge. Without an interval (fewer than two seeds) the outcome is inconclusive.
    """

    effect: str  # the difference the interval is of, e.g. "steps to 95% without BN − with BN"
    margin: float = 0.0
    kind: str = "exceeds"
    unit: str = ""  # what the printed margin and intervals are in, e.g. "points"
    scale: float = 1.0  # the printed numbers are the values times this (100: accuracy in points)

    def __post_init__(self):
        if self.kind not in ("exceeds", "within"):
            raise ValueError(f"kind must be 'exceeds' or 'within', got {self.kind!r}")
        if self.kind == "within" and not self.margin > 0:
            raise ValueError("a 'within' test needs a positive margin")

    def outcome(self, iv: Interval) -> str:
        if iv.n < 2 or math.isnan(iv.low) or math.isnan(iv.high):
            return "inconclusive"
        m = self.margin
        if self.kind == "exceeds":
            return "supported" if iv.low > m else "not supported" if iv.high < m else "inconclusive"
        if -m < iv.low and iv.high < m:
            return "supported"
        return "not supported" if iv.low >= m or iv.high <= -m else "inconclusive"

    def _number(self, value: float) -> str:
        return f"{value * self.scale:.3g}"

    def signed(self, value: float) -> str:
        """``value`` as the rule's effects are printed: scaled, signed, three digits, and whole numbers
        from a thousand on (step counts: +5,700, not +5.7e+03)."""
        scaled = value * self.scale
        return f"{scaled:+,.0f}" if abs(scaled) >= 1000 else f"{scaled:+.3g}"

    def interval(self, iv: Interval) -> str:
        """``mean [low, high] unit``, or ``mean (n = 1)`` without an interval."""
        if iv.n < 2 or math.isnan(iv.low):
            return f"{self.signed(iv.mean)} (n = {iv.n})"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.signed(iv.mean)} [{self.signed(iv.low)}, {self.signed(iv.high)}]{unit}"

    @property
    def _margin(self) -> str:
        number = self._number(self.margin)
        text = f"±{number}" if self.kind == "within" else number
        unit = self.unit.removesuffix("s") if number == "1" else self.unit  # 1 point, 0.5 points
        return f"{text} {unit}" if unit else text

    @property
    def supported_text(self) -> str:
        where = "inside" if self.kind == "within" else "above"
        return f"the 95% Welch CI of ({self.effect}) lies {where} {self._margin}"

    def refuted_text(self, named: bool = True) -> str:
        subject = f"the CI of ({self.effect})" if named else "that CI"
        if self.kind == "within":
            return f"{subject} lies entirely outside {self._margin}"
        return f"{subject} lies below {self._margin}"

    def describe(self, iv: Interval) -> str:
        if iv.n < 2 or math.isnan(iv.low):
            return f"{self.effect}: no interval (n = {iv.n})"
        return f"{self.effect}: {self.interval(iv)} → {self.outcome(iv)}"


@dataclass(frozen=True)
class Rule:
    """A claim's verdict rule, as data: both the text printed above the result and the verdict are
    made from it, so the two cannot drift apart.

    Supported if every test is supported (for each ``each`` condition, when given); not supported if
    any test is not supported; inconclusive otherwise.
    """

    tests: tuple[Criterion, ...]
    each: str = ""  # e.g. "recipe": the tests are applied to every recipe
    # where the intervals are in a claim's ``numbers``: one per test, or {condition: one per test}
    evidence: Callable[[dict], object] | None = None

    def judge(self, numbers: dict) -> tuple[str, str]:
        """``(verdict, reason)`` for a claim's numbers (a run's, or a stored result's, so an old result
        can be judged again by the rule as written now)."""
        return self.verdict(self.evidence(numbers))

    @property
    def text(self) -> str:
        supported = " and ".join(t.supported_text for t in self.tests)
        refuted = " or ".join(t.refuted_text(named=len(self.tests) > 1) for t in self.tests)
        if self.each:
            return (f"supported if, for every {self.each}, {supported}; not supported if, for any {self.each}, "
                    f"{refuted}; inconclusive otherwise")
        return f"supported if {supported}; not supported if {refuted}; inconclusive otherwise"

    def verdict(self, intervals) -> tuple[str, str]:
        """``(verdict, reason)`` from one :class:`~bnlab.stats.Interval` per test, or, with ``each``,
        ``{condition: [one per test]}``. The reason lists every interval and its outcome."""
        cases = intervals if self.each else {"": intervals}
        outcomes, parts = [], []
        for condition, ivs in cases.items():
            ivs = [iv if isinstance(iv, Interval) else Interval.from_dict(iv) for iv in ivs]
            if len(ivs) != len(self.tests):
                raise ValueError(f"{len(self.tests)} test(s), {len(ivs)} interval(s)")
            for test, iv in zip(self.tests, ivs):
                outcomes.append(test.outcome(iv))
                parts.append((f"{condition}: " if condition else "") + test.describe(iv))
        if not outcomes:
            raise ValueError("no intervals to judge")
        if all(o == "supported" for o in outcomes):
            verdict = "supported"
        elif "not supported" in outcomes:
            verdict = "not supported"
        else:
            verdict = "inconclusive"
        return verdict, "; ".join(parts)


def _plain(value):
    """``value`` with tuples as lists and tensors as (nested) lists: what JSON stores and gives back."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def figure(file: str, kind: str, **args) -> dict:
    """A figure as data: the plot ``kind`` (a function of :mod:`bnlab.report.plots`), the ``file`` it is
    drawn to, and its ``args`` (series, labels) as plain JSON values."""
    return {"file": file, "kind": kind, "args": _plain(args)}
