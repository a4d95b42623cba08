"""The claims lab: every claim of the seeds as an experiment with a protocol, a statistic and a verdict rule.

``CLAIMS`` maps a name to its :class:`Claim`; ``claim.execute(ctx)`` runs it (training
through the run store, so finished arms are reused and interrupted ones resume) and
saves its :class:`ClaimResult` as JSON beside the store.

Layout: ``base`` (claim, rule, result, context), ``protocols`` (every size, quick and full),
``common`` (reading summaries), one module per family of claims (``speed``, ``robustness``,
``mechanism``, ``architecture``, ``batch_size``, ``inference``, ``regularization``), and
``registry`` listing them. Claims return numbers and figure specs; :mod:`bnlab.report` draws.
"""

from bnlab.experiments.claims.base import Arm, Claim, ClaimContext, ClaimResult, Criterion, Rule
from bnlab.experiments.claims.registry import CLAIMS

DEFAULT_SEEDS = {"quick": 3, "full": 5}

__all__ = ["CLAIMS", "Claim", "ClaimContext", "ClaimResult", "Arm", "Rule", "Criterion", "DEFAULT_SEEDS"]
