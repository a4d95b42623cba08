"""Where an experiment's training groups run: here, one after another, or as tasks on a Ray cluster.

An executor's ``map(fn, calls)`` runs ``fn(*args)`` for each ``args`` in ``calls`` and returns the
results in order. The functions it runs train away from the run store
(:func:`bnlab.train.runner.train_detached`); the caller records the results, so the store keeps a
single writer and its guarantees (leases, resume) hold whatever runs the training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

from bnlab.errors import BnlabError

__all__ = ["RayExecutor"]


class RayExecutor:
    """Each call a Ray task with one CPU (retried if its worker dies); the data is put in Ray's object
    store once and shared by every task.

    Args:
        address: a running cluster (``ray://host:10001``, ``auto``), or None for a local instance with
            ``num_cpus`` CPUs (default: all of this machine's).
        max_retries: how many times a task whose worker died is run again.
    """

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, max_retries: int = 3):
        try:
            import ray
        except ImportError:
            raise BnlabError("--ray needs Ray: pip install 'bnlab[ray]'") from None
        self._ray = ray
        self.max_retries = max_retries
        if not ray.is_initialized():
            options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **options)

    def map(self, fn: Callable, calls: Sequence[tuple], *, shared: dict | None = None) -> list:
        """``[fn(*args, **shared) for args in calls]`` as parallel tasks; ``shared`` keyword values (a
        dataset) go to the object store once."""
        results = [None] * len(calls)
        for index, result in self.as_completed(fn, calls, shared=shared):
            results[index] = result
        return results

    def as_completed(self, fn: Callable, calls: Sequence[tuple], *, shared: dict | None = None,
                     per_call: Sequence[dict] | None = None) -> Iterator[tuple[int, object]]:
        """``(index, fn(*calls[index], **shared, **per_call[index]))`` for every call, as each task
        finishes, so the caller can record a result while the others still run. ``per_call`` keyword
        values (e.g. one dataset per call) go to the object store once per distinct object."""
        ray = self._ray
        refs = {name: ray.put(value) for name, value in (shared or {}).items()}
        put: dict[int, object] = {}  # id(value) -> its object ref: a dataset shared by several calls is put once

        def ref_of(value):
            if id(value) not in put:
                put[id(value)] = ray.put(value)
            return put[id(value)]

        remote = ray.remote(num_cpus=1, max_retries=self.max_retries)(fn)
        pending = {}
        for index, args in enumerate(calls):
            extra = {name: ref_of(value) for name, value in (per_call[index] if per_call else {}).items()}
            pending[remote.remote(*args, **refs, **extra)] = index
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    yield pending.pop(ref), ray.get(ref)
        finally:  # a failed task or an interrupted caller: the tasks still running are not wanted
            for ref in pending:
                ray.cancel(ref, force=True)

    def shutdown(self) -> None:
        self._ray.shutdown()
