"""``bnlab claims``: list the claims, run them, and write the report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bnlab.cli.common import add_ray_option, add_store_option, open_store, output_dir, positive_int, ray_executor
from bnlab.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("claims", help="test the seeds' claims about BN: list, run, report")
    sub = p.add_subparsers(dest="claims_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="the claims, their verdict rules, and the latest verdicts")
    run = sub.add_parser("run", help="run one claim (or 'all'); finished runs are reused, interrupted ones resume")
    run.add_argument("names", nargs="+", metavar="NAME", help="claim names from 'bnlab claims list', or 'all'")
    run.add_argument("--quick", action="store_true",
                     help="the short protocol (fewer steps and seeds, stated in the results)")
    run.add_argument("--seeds", type=positive_int, default=None, help="seeds per arm (default: 3 quick, 5 full)")
    run.add_argument("--out", type=Path, default=Path("out/claims"), help="where plots go (default: out/claims)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--jobs", type=positive_int, default=1,
                     help="claims run in this many processes at once, the cores shared among them (each process "
                          "then trains with cores/jobs threads; two 2-thread jobs on 2 cores would stall each "
                          "other). Default 1")
    add_ray_option(run, "the arms (a claim's independent arms at once)")
    report = sub.add_parser("report", help="write claims.md and index.html from the latest results")
    report.add_argument("--out", type=Path, default=Path("out/claims"),
                        help="figures and the self-contained index.html (default: out/claims)")
    report.add_argument("--markdown", type=Path, default=None,
                        help="where claims.md goes, its image links relative to it (default: OUT/claims.md)")
    report.add_argument("--previous", type=Path, default=None, metavar="OLD.md",
                        help="an earlier report: list the verdicts and protocols that changed since (the file may be "
                             "the one --markdown replaces: it is read first)")
    for action in (sub.choices["list"], run, report):
        add_store_option(action)
    p.set_defaults(run=_dispatch)


def _expected_seconds(results_dir: Path, name: str, protocol: str, seeds: int) -> float | None:
    """How long this claim should take: its last run's wall time at this protocol, or, with another number
    of seeds (every arm trains again), the time its arms took to train (a last run that reused them took
    seconds); scaled to ``seeds`` (the stacked engine trains an arm's seeds together, so this errs high).
    None if it never ran."""
    from bnlab.experiments.claims import ClaimResult

    path = results_dir / f"{name}.{protocol}.json"
    if not path.is_file():
        return None
    try:
        last = ClaimResult.load(path)
    except (ValueError, TypeError, OSError):
        return None
    base = last.wall_seconds if seeds == last.seeds else max(last.wall_seconds, last.arm_seconds)
    return base * max(1.0, seeds / max(1, last.seeds))


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M", time.localtime(time.time() + seconds))


def _queues(names: list[str], jobs: int, expected: dict[str, float]) -> list[list[str]]:
    """Claims split into ``jobs`` queues, longest first onto the least loaded queue (a claim never run
    here counts as the longest known); each queue keeps the claims in their number order."""
    from bnlab.experiments.claims import CLAIMS

    longest = max(expected.values(), default=1.0)
    load = [0.0] * jobs
    queues: list[list[str]] = [[] for _ in range(jobs)]
    for name in sorted(names, key=lambda n: -expected.get(n, longest)):
        i = load.index(min(load))
        queues[i].append(name)
        load[i] += expected.get(name, longest)
    return [sorted(q, key=lambda n: CLAIMS[n].number) for q in queues if q]


def _run_in_parallel(args: argparse.Namespace, names: list[str], results_dir: Path, protocol: str, seeds: int) -> int:
    """Each queue in a ``bnlab claims run`` process of its own, with the cores divided among them. Claims
    that share arms (1, 9, 11, 14, 15) stay correct: the store lets one process train a shared arm while
    another waits for it and then reuses it."""
    import os
    import subprocess
    import sys
    import threading

    expected = {n: e for n in names if (e := _expected_seconds(results_dir, n, protocol, seeds)) is not None}
    queues = _queues(names, args.jobs, expected)
    threads = max(1, (os.cpu_count() or 1) // len(queues))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    base = [sys.executable, "-m", "bnlab.cli.main", "claims", "run", "--seeds", str(seeds), "--out", str(args.out),
            "--no-progress", "--store", str(args.store or "")]
    if args.store is None:
        base = base[:-2]
    if args.quick:
        base.append("--quick")
    print(f"{len(names)} claims in {len(queues)} processes of {threads} thread(s) each:", flush=True)
    procs = []
    for i, queue in enumerate(queues):
        print(f"  job {i + 1}: {', '.join(queue)}", flush=True)
        procs.append(subprocess.Popen([*base, *queue], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))

    def relay(i: int, proc) -> None:
        for line in proc.stdout:
            if line.strip() and not line.startswith("write the report"):
                print(f"[job {i + 1}] {line.rstrip()}", flush=True)

    relays = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in relays:
        t.start()
    codes = [p.wait() for p in procs]
    for t in relays:
        t.join()
    print("write the report with: bnlab claims report")
    return max(codes)


def _dispatch(args: argparse.Namespace) -> int:
    from bnlab.experiments.claims import CLAIMS, DEFAULT_SEEDS, ClaimContext
    from bnlab.report.claims_report import draw_figures, load_results, write_claims_report

    if args.claims_command in ("run", "report"):
        output_dir(args.out)
    with open_store(args, readonly=args.claims_command != "run") as store:
        results_dir = store.path.parent / "claims"
        if args.claims_command == "list":
            latest = load_results(results_dir) if results_dir.exists() else {}
            for claim in sorted(CLAIMS.values(), key=lambda c: c.number):
                r = latest.get(claim.name)
                status = f"{r.verdict} ({r.protocol})" if r else "not run"
                print(f"{claim.number:>2}. {claim.name:<18s} {claim.title:<52s} {status}")
                print(f"    rule: {claim.rule}")
            return 0
        if args.claims_command == "report":
            if args.previous is not None and not args.previous.is_file():
                raise UsageError(f"--previous {args.previous}: no such file (an earlier claims.md to compare with)")
            paths = write_claims_report(load_results(results_dir) if results_dir.exists() else {}, args.out,
                                        args.markdown, args.previous)
            print(f"report: {paths['markdown']} and {paths['html']}")
            return 0
        if "all" in args.names and len(args.names) > 1:
            raise UsageError("give 'all' alone, or a list of claim names")
        names = sorted(CLAIMS, key=lambda n: CLAIMS[n].number) if args.names == ["all"] else list(args.names)
        unknown = [n for n in names if n not in CLAIMS]
        if unknown:
            raise UsageError(f"unknown claim {unknown[0]!r}; see 'bnlab claims list'")
        protocol = "quick" if args.quick else "full"
        seeds = args.seeds or DEFAULT_SEEDS[protocol]
        if args.ray is not None and args.jobs > 1:
            raise UsageError("give --jobs (processes on this machine) or --ray (tasks on a Ray cluster), not both")
        if args.jobs > 1 and len(names) > 1:
            return _run_in_parallel(args, names, results_dir, protocol, seeds)
        ctx = ClaimContext(store=store, quick=args.quick, seeds=seeds, out_dir=args.out, fetch=True,
                           progress=not args.no_progress, executor=ray_executor(args))
        for position, name in enumerate(names, 1):
            expected = _expected_seconds(results_dir, name, protocol, seeds)
            if expected is not None:
                eta = f"the last run took {expected / 60:.0f} min: done about {_clock(expected)}"
            else:
                eta = "no earlier run to estimate from" + ("; each arm's bar shows its own ETA" if ctx.progress else "")
            print(f"[{position}/{len(names)}] {CLAIMS[name].number}. {name} ({protocol}, {seeds} seeds): {eta}",
                  flush=True)
            result = CLAIMS[name].execute(ctx)
            draw_figures({name: result}, args.out)
            print(f"{CLAIMS[name].number:>2}. {name}: {result.verdict} ({protocol}, {seeds} seeds, "
                  f"{result.wall_seconds:.0f} s) because {result.reason}", flush=True)
        print("write the report with: bnlab claims report")
    return 0
