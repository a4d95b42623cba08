"""What a claim is, how its arms are trained, and what a verdict is made of.

A :class:`Claim` pairs a statement from the seeds with a protocol (quick and
full), a statistic, a **verdict rule fixed in code before any run**, and the
published number or figure it should be compared with. Running it trains its
*arms* (one model configuration each, over several seeds) through the run
store, so an arm shared by two claims, or by a rerun, is trained once.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bnlab.data import Dataset, load_dataset
from bnlab.experiments.common import summarise_group
from bnlab.models import ModelSpec
from bnlab.stats import Interval
from bnlab.store import RunStore
from bnlab.train import TrainConfig, run_group
from bnlab.train.runner import code_version

__all__ = ["Claim", "ClaimContext", "ClaimResult", "Arm", "VERDICTS", "compare_interval"]

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

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            self.datasets[name] = load_dataset(name)
        return self.datasets[name]

    def train(self, claim: str, arm: Arm, probes: tuple = (), start_from=None) -> dict:
        """Train (or reuse) ``arm`` on seeds 0..seeds-1; return :func:`summarise_group`'s summary.

        ``probes`` add metric series (see :mod:`bnlab.probes`). They never change the training, so
        they are not part of the arm's identity: a finished arm is reused with the series it was
        first trained with, and a claim that needs probe series should name its arms uniquely.
        ``start_from`` (:class:`bnlab.train.runner.StartFrom`) fine-tunes another group's models.
        """
        result = run_group(self.store, f"claim:{claim}/{arm.label}", arm.spec, arm.cfg, list(range(self.seeds)),
                           dataset=self.dataset(arm.cfg.dataset), probes=probes, progress=self.progress,
                           start_from=start_from)
        self.data_orders.add(self.store.run(result.run_ids[0]).config["train"]["data_order"])
        return {**summarise_group(self.store, result, all_series=True), "label": arm.label}

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
    verdict: str
    reason: str  # the rule applied to these numbers, in words
    plots: list[str]
    runs: dict[str, list[str]]  # arm label -> run ids
    wall_seconds: float
    code_version: str = field(default_factory=code_version)
    # "per_seed" when every arm gave each seed its own batch order; "shared" when all seeds saw the
    # same batches, so the CIs cover initialization only (every result made before 2026-12-02)
    data_order: str = "shared"

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.claim}.{self.protocol}.json"
        path.write_text(json.dumps(asdict(self), indent=2, default=_nan_to_none))
        return path

    @classmethod
    def load(cls, path: Path) -> ClaimResult:
        return cls(**json.loads(path.read_text()))


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


@dataclass(frozen=True)
class Claim:
    """A statement from the seeds, made testable.

    Attributes:
        name: the id used on the command line (``bnlab claims run NAME``).
        number: its number in the claims list.
        title: one line.
        seed_wording: what the seeds say, briefly quoted, with the seed number.
        rule: the verdict rule, stated before any run.
        anchor: the published number or figure to set ours against.
        run: ``run(ctx) -> ClaimResult``.
    """

    name: str
    number: int
    title: str
    seed_wording: str
    rule: str
    anchor: str
    run: Callable[[ClaimContext], ClaimResult]

    def execute(self, ctx: ClaimContext) -> ClaimResult:
        started = time.perf_counter()
        ctx.data_orders.clear()
        result = self.run(ctx)
        result.wall_seconds = time.perf_counter() - started
        result.data_order = "per_seed" if ctx.data_orders == {"per_seed"} else "shared"
        result.save(ctx.store.path.parent / "claims")
        return result


def compare_interval(iv: Interval, *, margin: float = 0.0) -> str:
    """Where a 95% interval of an effect lies relative to zero and an equivalence band ±margin.

    ``"positive"``: entirely above ``margin``; ``"negative"``: entirely below ``-margin``;
    ``"equivalent"``: entirely inside ``(-margin, margin)`` (a real but negligible effect, or
    none); ``"unclear"`` otherwise. With one seed (no interval) the answer is ``"unclear"``.
    """
    if iv.n < 2 or math.isnan(iv.low):
        return "unclear"
    if iv.low > margin:
        return "positive"
    if iv.high < -margin:
        return "negative"
    if margin > 0 and -margin < iv.low and iv.high < margin:
        return "equivalent"
    return "unclear"

