"""Training jobs for the web app: one per browser session, all trained by one worker thread.

A :class:`Job` holds one session's :class:`Pair`: two networks built from the
same :class:`~bnlab.models.ModelSpec` but for the normalization (``none`` vs the
chosen kind), starting from the same weights and trained on the same batches.

Threads. Torch ops on a 2-core machine slow each other down 10-60x when two
jobs each run 2 intra-op threads (OpenMP oversubscription). So no job owns a
thread: the :class:`JobManager` owns *one* worker thread that time-slices every
live job (a slice of steps of job A, then of job B, ...), and sets torch's
intra-op thread count from the cores (:func:`torch_threads`), leaving a core to
the event loop, which serialises and sends the data and must answer the page
within a frame. The event loop never runs torch; it talks to the worker
through each job's inbox and outbox.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnlab.data import Dataset, load_dataset
from bnlab.models.spec import ModelSpec, build_model
from bnlab.probes import probe_output
from bnlab.train.engine import batch_order, stratified_subset
from bnlab.web.schema import GHOST_SIZE, LIVE, ProtocolError, check_settings, default_settings

__all__ = ["Pair", "Job", "JobManager", "TooManyJobs", "WebData", "torch_threads", "NAMES"]

NAMES = ("plain", "norm")  # the network without normalization, and the one with the chosen kind
PERCENTILES = (15, 50, 85)  # Ioffe & Szegedy's Figure 1
HIST_BINS = 40
PROBE_SECONDS = 0.25  # histograms, percentiles, gradient norms and test accuracy, at most this often
PATH_EVERY = 10  # steps between the weight snapshots that view 4 projects
PATH_BUDGET = 16 * 2**20  # bytes of snapshots kept per network
CNN_CHANNELS = (8, 16)  # the CNN's convolutions; depth and width set its dense layers


def torch_threads(cores: int | None = None) -> int:
    """Torch intra-op threads for the worker: every core but one, which the event loop keeps.

    Jobs time-slice one worker thread, so however many jobs are live only one
    runs torch at a time: their number never multiplies the threads.
    """
    cores = cores or os.cpu_count() or 1
    return max(1, cores - 1)


@dataclass(frozen=True)
class WebData:
    """One dataset as the app uses it: images ``(N, 1, 28, 28)`` (the MLP flattens them itself)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor  # a fixed stratified subset: test accuracy is cheap enough to plot live
    test_y: Tensor
    probe_x: Tensor  # fixed training examples the histograms and views are measured on
    probe_y: Tensor

    @classmethod
    def from_dataset(cls, dataset: Dataset, *, test_size: int = 500, probe_size: int = 256) -> WebData:
        train_x, train_y = dataset.tensors("train", flatten=False)
        test_x, test_y = dataset.tensors("test", flatten=False)
        test = stratified_subset(test_y, test_size)
        probe = stratified_subset(train_y, probe_size, seed=1)
        return cls(train_x, train_y, test_x[test].contiguous(), test_y[test].contiguous(),
                   train_x[probe].contiguous(), train_y[probe].contiguous())


def model_spec(settings: dict, norm: str) -> ModelSpec:
    """The :class:`ModelSpec` the page's ``settings`` describe, with normalization ``norm``."""
    cnn = settings["arch"] == "cnn"
    return ModelSpec(
        arch=settings["arch"], hidden=(settings["width"],) * settings["depth"],
        conv_channels=CNN_CHANNELS if cnn else (), activation=settings["activation"], norm=norm,
        placement=settings["placement"], dropout=settings["dropout"], init=settings["init"],
        init_scale=settings["init_scale"], norm_momentum=settings["bn_momentum"], norm_eps=settings["eps"],
        virtual_batch_size=GHOST_SIZE)


def weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _optimizer(settings: dict, params) -> torch.optim.Optimizer:
    # fused: one pass over each parameter instead of a loop of small ops (as the engine does)
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=settings["lr"], fused=True)
    return torch.optim.SGD(params, lr=settings["lr"], fused=True)


class Pair:
    """The two networks of one session and their shared batch stream.

    Both are built by :func:`~bnlab.models.build_model` from the same seed, and
    the weights of their linear and convolution layers are then copied from the
    plain network to the normalized one, so they start equal whatever the
    normalization layers drew. Each step, both train on the same batch: the
    next ``batch_size`` examples of :func:`~bnlab.train.engine.batch_order`'s
    permutation of the epoch (an epoch's incomplete last batch is skipped).
    """

    def __init__(self, settings: dict, data: WebData):
        self.settings = dict(settings)
        self.data = data
        self.specs = {name: model_spec(settings, kind) for name, kind in zip(NAMES, ("none", settings["norm"]))}
        self.models = {name: build_model(spec, seed=settings["seed"]) for name, spec in self.specs.items()}
        for src, dst in zip(weight_layers(self.models["plain"]), weight_layers(self.models["norm"])):
            with torch.no_grad():
                dst.weight.copy_(src.weight)
                if src.bias is not None and dst.bias is not None:
                    dst.bias.copy_(src.bias)
        self.optimizers = {name: _optimizer(settings, m.parameters()) for name, m in self.models.items()}
        self.step = 0
        self._epoch, self._position, self._order = -1, 0, None
        # Dropout draws from torch's global generator, which every session's steps share: each Pair
        # keeps its own state of it (swapped in by the worker), so a session depends on its settings only.
        # Seeded here, not inherited from whatever build_model left in the global generator.
        self.rng_state = torch.Generator().manual_seed(settings["seed"] + 1_000_003).get_state()
        size = sum(p.numel() for p in self.models["norm"].parameters()) * 4
        self.path = {name: collections.deque(maxlen=max(2, min(40, PATH_BUDGET // size))) for name in NAMES}

    # -- the stream of batches ------------------------------------------------------------------

    def next_batch(self) -> tuple[Tensor, Tensor]:
        n, b = len(self.data.train_y), self.settings["batch_size"]
        if self._order is None or self._position + b > n:
            self._epoch += 1
            self._order = batch_order(self.settings["seed"], self.settings["seed"], self._epoch, n)
            self._position = 0
        idx = self._order[self._position : self._position + b]
        self._position += b
        return self.data.train_x[idx], self.data.train_y[idx]

    def train_step(self) -> tuple[float, float]:
        """One SGD/Adam step of both networks on the same batch; their losses."""
        x, y = self.next_batch()
        losses = []
        for name in NAMES:
            model, opt = self.models[name], self.optimizers[name]
            if not model.training:
                model.train()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        self.step += 1
        if self.step % PATH_EVERY == 0:
            for name in NAMES:
                self.path[name].append((self.step, self.flat_params(name)))
        return losses[0], losses[1]

    def flat_params(self, name: str) -> Tensor:
        return torch.cat([p.detach().flatten() for p in self.models[name].parameters()])

    # -- live changes ---------------------------------------------------------------------------

    def apply_live(self, changes: dict) -> None:
        """Settings that act on the running networks (:data:`~bnlab.web.schema.LIVE`)."""
        self.settings.update(changes)
        if "optimizer" in changes:  # a fresh optimizer on the current weights (its state restarts)
            self.optimizers = {name: _optimizer(self.settings, m.parameters()) for name, m in self.models.items()}
        elif "lr" in changes:
            for opt in self.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = changes["lr"]
        for m in self.models["norm"].modules():
            if "bn_momentum" in changes and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = changes["bn_momentum"]
            if "eps" in changes and hasattr(m, "eps"):  # only the norm layers have an eps
                m.eps = changes["eps"]
        self.specs["norm"] = self.specs["norm"].with_(norm_momentum=self.settings["bn_momentum"],
                                                      norm_eps=self.settings["eps"])

    # -- measurements ---------------------------------------------------------------------------

    def hidden_layers(self, name: str) -> list[dict[str, nn.Module]]:
        """Per hidden block (convolutions first): its ``activation`` and, if any, its ``norm`` module."""
        model, blocks, current = self.models[name], [], {}
        for m in model:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                current = {}
                blocks.append(current)
            elif isinstance(m, (nn.ReLU, nn.Sigmoid, nn.Tanh)):
                current["activation"] = m
            elif not isinstance(m, (nn.Dropout, nn.MaxPool2d, nn.Flatten, nn.Identity)):
                current["norm"] = m  # whatever else a block holds is its normalization (build_model's blocks)
        return [b for b in blocks if "activation" in b]  # the output layer has none

    def telemetry(self, ranges: dict) -> dict:
        """Test accuracy, per-layer pre-activation histograms and percentiles, and gradient norms.

        Pre-activations are the inputs of each activation function on the fixed
        probe batch, in train mode (batch statistics, as the network trains),
        without touching running statistics or the RNG; for the normalized
        network also the input of each norm layer ("before norm"). ``ranges``
        keeps each histogram's range fixed from its first measurement, so the
        histograms over time line up.
        """
        out = {"step": self.step, "test_acc": {}, "test_loss": {}, "layers": {}, "grad_norm": {}}
        for name in NAMES:
            model = self.models[name]
            logits, _ = probe_output(model, self.data.test_x, train_mode=False)
            out["test_acc"][name] = float((logits.argmax(1) == self.data.test_y).float().mean())
            out["test_loss"][name] = float(nn.functional.cross_entropy(logits, self.data.test_y))
            blocks = self.hidden_layers(name)
            points = [("pre", i, b["activation"]) for i, b in enumerate(blocks)]
            if name == "norm":
                points += [("in", i, b["norm"]) for i, b in enumerate(blocks) if "norm" in b]
            # hooks fire in the order the modules run, which in a Sequential is their position
            position = {id(m): i for i, m in enumerate(model)}
            points.sort(key=lambda point: position[id(point[2])])
            _, captured = probe_output(model, self.data.probe_x, capture=[m for _, _, m in points])
            # one entry per hidden layer in both lists; "in" is None where a layer has no norm (e.g. the
            # CNN's dense layers with instance norm) and empty for the network without normalization
            layers = {"pre": [None] * len(blocks), "in": [None] * len(blocks) if name == "norm" else []}
            for (what, i, _), values in zip(points, captured):
                layers[what][i] = distribution(values, ranges, (name, what, i))
            out["layers"][name] = layers
            out["grad_norm"][name] = [None if m.weight.grad is None else float(m.weight.grad.norm())
                                      for m in weight_layers(model)]
        return out


def distribution(values: Tensor, ranges: dict, key) -> dict:
    """Percentiles and a histogram of ``values`` over a range fixed at the first call for ``key``."""
    flat = values.detach().float().flatten()
    # quantile sorts: on a strided sample of ~2000 values it costs ~0.1 ms instead of ~2 (25,600 values),
    # and moves a plotted percentile by about a percent of the spread
    sample = flat[:: flat.numel() // 2048 + 1]
    if key not in ranges:
        top = float(sample.abs().quantile(0.99)) * 1.25 if sample.numel() else 1.0
        ranges[key] = _nice(max(top, 0.5))
    r = ranges[key]
    q = torch.quantile(sample, torch.tensor([p / 100 for p in PERCENTILES]))
    counts = torch.histc(flat.clamp(-r, r), bins=HIST_BINS, min=-r, max=r)  # the edge bins hold what lies beyond
    return {"p": [round(float(v), 5) for v in q], "range": r,
            "hist": [round(float(c), 4) for c in counts / max(flat.numel(), 1)]}


def _nice(x: float) -> float:
    """The smallest of 1, 2, 5 × 10^k not below ``x``."""
    import math

    k = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10**k >= x:
            return float(m * 10**k)
    return float(10 ** (k + 1))


class TooManyJobs(RuntimeError):
    """Every job slot is taken; the page is told to close another tab."""


class Job:
    """One browser session's training: settings, status, the :class:`Pair`, inbox and outbox.

    The event loop calls :meth:`submit` (validated messages) and :meth:`take_outbox` /
    :meth:`take_tick`; the worker calls :meth:`run_slice`. ``notify`` is called (from the
    worker) whenever the outbox gains a message that should go out at once.
    """

    MAX_INBOX = 64

    def __init__(self, job_id: int, manager: JobManager, notify: Callable[[], None]):
        self.id, self.manager, self.notify = job_id, manager, notify
        self.settings = default_settings()
        self.state = "paused"  # paused | running | error
        self.pair: Pair | None = None
        self.closed = False
        self._lock = threading.Lock()
        self._inbox: list[dict] = []
        self._views: dict[str, dict] = {}  # the latest request per view: a slider's burst collapses to one
        # replies waiting for the socket; bounded, so a page that sends but never reads cannot grow it
        self._outbox: collections.deque[dict] = collections.deque(maxlen=1000)
        self._losses: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=2000)
        self._probe: dict | None = None
        self._ranges: dict = {}
        self._last_probe = 0.0
        self.steps_trained = 0  # over the job's life, for throughput measurements
        self.train_seconds = 0.0

    # -- event-loop side ------------------------------------------------------------------------

    def submit(self, message: dict) -> None:
        """Queue a validated message (see :mod:`bnlab.web.schema`) for the worker."""
        with self._lock:
            if message["type"] == "view":
                self._views[message["view"]] = message
            elif len(self._inbox) >= self.MAX_INBOX:
                raise ProtocolError("too many messages waiting; slow down")
            else:
                self._inbox.append(message)
        self.manager.wake()

    def emit(self, message: dict) -> None:
        self._outbox.append(message)
        self.notify()

    def take_outbox(self) -> list[dict]:
        out = []
        while self._outbox:
            out.append(self._outbox.popleft())
        return out

    def take_tick(self) -> dict | None:
        """Everything measured since the last tick, as one ``tick`` message (or None)."""
        with self._lock:
            losses, self._losses = list(self._losses), collections.deque(maxlen=2000)
            probe, self._probe = self._probe, None
        if not losses and probe is None:
            return None
        return {"type": "tick", "state": self.state, "step": self.pair.step if self.pair else 0,
                "steps": [s for s, _, _ in losses],
                "loss": {"plain": [a for _, a, _ in losses], "norm": [b for _, _, b in losses]},
                "probe": probe}

    def has_work(self) -> bool:
        return bool(self._inbox or self._views or (self.state == "running" and not self.closed))

    # -- worker side ----------------------------------------------------------------------------

    def run_slice(self, deadline: float, interrupted: Callable[[], bool]) -> None:
        """Handle queued messages, then train until ``deadline`` or until a request waits."""
        from bnlab.web import views

        try:
            with self._lock:
                inbox, self._inbox = self._inbox, []
                requests, self._views = list(self._views.values()), {}
            for message in inbox:
                self._handle(message)
            if self.pair is None and (requests or self.state == "running"):
                self._rebuild()
            for request in requests:
                data = views.compute(request["view"], self, request["params"])
                self.emit({"type": "view", "view": request["view"], "id": request["id"], "data": data})
            if self.state == "running" and not self.closed:
                self._train(deadline, interrupted)
        except Exception as exc:  # noqa: BLE001 - a failing job reports to its page; the server lives on
            self.state = "error"
            self.emit({"type": "error", "where": "job", "message": f"{type(exc).__name__}: {exc}",
                       "detail": traceback.format_exc(limit=3)})
            self._emit_status()

    def _train(self, deadline: float, interrupted: Callable[[], bool]) -> None:
        pair = self.pair
        torch.set_rng_state(pair.rng_state)
        try:
            while self.state == "running" and not self.closed and time.perf_counter() < deadline:
                started = time.perf_counter()
                losses = pair.train_step()
                self.train_seconds += time.perf_counter() - started
                self.steps_trained += 1
                with self._lock:
                    self._losses.append((pair.step, *losses))
                if started - self._last_probe >= PROBE_SECONDS:
                    self._last_probe = started
                    probe = pair.telemetry(self._ranges)
                    with self._lock:
                        self._probe = probe
                if interrupted():
                    break
        finally:
            pair.rng_state = torch.get_rng_state()

    def _handle(self, message: dict) -> None:
        if message["type"] == "settings":
            try:
                merged = check_settings(message["values"], self.settings)
            except ProtocolError as exc:
                self.emit({"type": "error", "where": "message", "message": str(exc)})
                return
            changed = {k: v for k, v in merged.items() if v != self.settings[k]}
            self.settings = merged
            rebuild = bool(set(changed) - LIVE) or self.pair is None
            if rebuild:
                self._rebuild()
            elif changed:
                self.pair.apply_live(changed)
            self.emit({"type": "settings", "values": self.settings, "rebuilt": rebuild})
        elif message["action"] == "start":
            if self.pair is None or self.state == "error":
                self._rebuild()
            self.state = "running"
        elif message["action"] == "pause":
            self.state = "paused" if self.state == "running" else self.state
        elif message["action"] == "reset":
            self.state = "paused"
            self._rebuild()
        self._emit_status()

    def _rebuild(self) -> None:
        """New networks from the settings (same seed: same initial weights and batches)."""
        if self.state == "error":
            self.state = "paused"
        self.pair = None  # a failed build leaves no half-built pair behind
        self.pair = Pair(self.settings, self.manager.data(self.settings["dataset"]))
        self._ranges = {}
        self._last_probe = 0.0
        with self._lock:
            self._losses.clear()
            self._probe = self.pair.telemetry(self._ranges)
        self.emit({"type": "rebuilt", "step": 0})

    def _emit_status(self) -> None:
        self.emit({"type": "status", "state": self.state, "step": self.pair.step if self.pair else 0})


class JobManager:
    """At most ``max_jobs`` live jobs, trained in turn by one worker thread.

    ``load`` returns a :class:`~bnlab.data.Dataset` by name (tests pass a small
    fake). ``slice_seconds`` is how long one job trains before the next one's turn.
    """

    def __init__(self, *, max_jobs: int = 4, load: Callable[[str], Dataset] = load_dataset,
                 slice_seconds: float = 0.02, threads: int | None = None):
        self.max_jobs, self.slice_seconds = max_jobs, slice_seconds
        self.threads = threads or torch_threads()
        self._load = load
        self._data: dict[str, WebData] = {}
        self._data_lock = threading.Lock()
        self._jobs: list[Job] = []
        self._cond = threading.Condition()
        self._next_id = 0
        self._stopping = False
        self._worker: threading.Thread | None = None

    def open(self, notify: Callable[[], None] = lambda: None) -> Job:
        """A new paused job with the default settings; :class:`TooManyJobs` when all slots are taken."""
        with self._cond:
            if len(self._jobs) >= self.max_jobs:
                raise TooManyJobs(f"the server trains at most {self.max_jobs} sessions at once; "
                                  "close another tab and reload this one")
            self._next_id += 1
            job = Job(self._next_id, self, notify)
            self._jobs.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="bnlab-web-worker", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        return job

    def close(self, job: Job) -> None:
        """Cancel ``job`` (its tab closed): the worker drops it before its next slice."""
        with self._cond:
            job.closed = True
            if job in self._jobs:
                self._jobs.remove(job)
            self._cond.notify_all()

    @property
    def jobs(self) -> list[Job]:
        """The live jobs, oldest first."""
        with self._cond:
            return list(self._jobs)

    @property
    def live_jobs(self) -> int:
        return len(self.jobs)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    def data(self, name: str) -> WebData:
        with self._data_lock:
            if name not in self._data:
                self._data[name] = WebData.from_dataset(self._load(name))
            return self._data[name]

    def _requests_waiting(self) -> bool:
        return any(job._inbox or job._views for job in list(self._jobs))

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._stopping and not any(j.has_work() for j in self._jobs):
                    self._cond.wait(0.5)
                if self._stopping:
                    return
                jobs = list(self._jobs)
            for job in jobs:
                if not job.closed:
                    job.run_slice(time.perf_counter() + self.slice_seconds, self._requests_waiting)
