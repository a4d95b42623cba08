"""The main job end to end: `bnlab compare` against the tutorial loops it replaces, in one invocation.

Two peers, each doing the same work as `bnlab compare` (both variants, the same seeds and epochs):

* torch-mlp: seed 003's PyTorch loop as written (`peers/seed003_loop.py`: its own DataLoader,
  batch 64, one test evaluation per epoch), looped over variants and seeds in one process;
* keras-mlp: seed 000's recipe in real Keras 3 with the torch backend (`peers/seed000_keras.py`,
  `model.fit` with validation on the test set each epoch). Keras costs ~10 s per model-epoch here,
  so it runs on `--keras-seeds` seeds (default 3); throughput is compared per model-epoch.

Every contender runs as its own process, one after another (two torch processes at once stall each
other on 2 cores), timed from process start to exit: interpreter start-up, imports, data loading,
training, evaluation and (for bnlab) the report all count. bnlab starts from an empty run store.
The ratio is the peer's seconds per model-epoch over bnlab's (> 1: bnlab is faster). Accuracies are
the final test accuracies per seed; bnlab's mean is called "within the spread" if it lies inside the
peer's [min - 2 sd, max + 2 sd] (sd over the peer's seeds; 0 with one seed).

Run:  .venv/bin/python benchmarks/bench_compare.py [--seeds 8] [--epochs 1] [--recipe both]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = Path(sys.executable)
BNLAB = PYTHON.with_name("bnlab")
BARS = {("torch-mlp", False): 1.2, ("torch-mlp", True): 2.5, ("keras-mlp", False): 10.0}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "KERAS_BACKEND": "torch"}


def _timed(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"bench_compare: {' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def run_peer(script: str, seeds: int, epochs: float, tmp: Path) -> dict:
    out = tmp / f"{script}.json"
    wall = _timed([str(PYTHON), str(HERE / "peers" / script), "--seeds", str(seeds), "--epochs", str(epochs),
                   "--json-out", str(out)], _env())
    result = json.loads(out.read_text())
    accs = result["final_test_acc"]
    return {"wall": wall, "model_epochs": sum(len(v) for v in accs.values()) * epochs, "accs": accs}


def run_bnlab(preset: str, seeds: int, epochs: float, bf16: bool, tmp: Path) -> dict:
    tag = f"{preset}{'-bf16' if bf16 else ''}"
    store, out = tmp / f"{tag}.sqlite", tmp / tag
    argv = [str(BNLAB), "compare", "--preset", preset, "--seeds", str(seeds), "--epochs", str(epochs),
            "--store", str(store), "--out", str(out), "--no-progress", *(["--bf16"] if bf16 else [])]
    wall = _timed(argv, {**_env(), "BNLAB_STORE": str(store)})
    summary = json.loads((out / "summary.json").read_text())
    accs = {label: [r["final_test_acc"] for r in v["per_seed"]] for label, v in summary["variants"].items()}
    return {"wall": wall, "model_epochs": sum(len(v) for v in accs.values()) * epochs, "accs": accs,
            "phases": summary.get("phases_seconds", {})}


def _acc_text(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f} ({100 * min(values):.2f}..{100 * max(values):.2f})"


def _within(peer: list[float], mine: list[float]) -> bool:
    sd = statistics.stdev(peer) if len(peer) > 1 else 0.0
    return min(peer) - 2 * sd <= statistics.mean(mine) <= max(peer) + 2 * sd


def compare(preset: str, peer_script: str, peer_seeds: int, seeds: int, epochs: float, bf16_too: bool,
            tmp: Path, report: dict) -> None:
    peer = run_peer(peer_script, peer_seeds, epochs, tmp)
    contenders = {"bnlab fp32": run_bnlab(preset, seeds, epochs, False, tmp)}
    if bf16_too:
        contenders["bnlab bf16"] = run_bnlab(preset, seeds, epochs, True, tmp)
    peer_rate = peer["wall"] / peer["model_epochs"]
    print(f"\n== {preset}: {peer_script} ({peer_seeds} seed(s) per variant) vs bnlab compare ({seeds} seeds), "
          f"{epochs:g} epoch(s)")
    print(f"{'contender':<14s} {'wall s':>7s} {'model-epochs':>12s} {'s/model-epoch':>13s} {'vs peer':>8s}   "
          "final test accuracy % per variant: mean ± sd (min..max)")
    rows = {"peer": peer, **contenders}
    for name, r in rows.items():
        rate = r["wall"] / r["model_epochs"]
        ratio = peer_rate / rate
        accs = "; ".join(f"{label}: {_acc_text(v)}" for label, v in r["accs"].items())
        print(f"{name:<14s} {r['wall']:>7.1f} {r['model_epochs']:>12g} {rate:>13.2f} {ratio:>7.2f}x   {accs}")
        r["ratio"] = ratio
    for name, r in contenders.items():
        phases = r["phases"]
        if phases:
            parts = ", ".join(f"{k} {v:.1f} s ({100 * v / r['wall']:.0f}%)" for k, v in phases.items())
            measuring = sum(phases.get(k, 0.0) for k in ("evaluation", "report"))
            print(f"  {name} phases: {parts}; evaluation + report = {100 * measuring / r['wall']:.1f}% of wall")
            r["measuring_share"] = measuring / r["wall"]
        else:
            print(f"  {name}: no phase breakdown in summary.json")
        peer_accs = list(peer["accs"].values())
        for (label, mine), theirs in zip(r["accs"].items(), peer_accs):
            print(f"  {name} {label}: mean accuracy {'within' if _within(theirs, mine) else 'OUTSIDE'} the peer's spread")
    for name, r in contenders.items():
        bar = BARS.get((preset, name.endswith("bf16")))
        if bar:
            print(f"bar {preset} {name} >= {bar}x the peer per model-epoch: {r['ratio']:.2f}x "
                  f"{'met' if r['ratio'] >= bar else 'NOT met'}")
    report[preset] = rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["torch-mlp", "keras-mlp", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--peer-seeds", type=int, default=None,
                        help="seeds per variant for seed 003's loop (default: --seeds)")
    parser.add_argument("--keras-seeds", type=int, default=3,
                        help="seeds per variant for Keras fit, ~10 s per model-epoch (default: 3)")
    parser.add_argument("--no-bf16", dest="bf16_too", action="store_false", help="skip bnlab --bf16")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"torch {torch.__version__}, 2 threads per process, {os.cpu_count()} cores: {cpu}")
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe in ("torch-mlp", "both"):
            compare("torch-mlp", "seed003_loop.py", args.peer_seeds or args.seeds, args.seeds, args.epochs,
                    args.bf16_too, Path(tmp), report)
        if args.recipe in ("keras-mlp", "both"):
            epochs = max(1, round(args.epochs))  # Keras' fit takes whole epochs
            compare("keras-mlp", "seed000_keras.py", args.keras_seeds, args.seeds, epochs, False,
                    Path(tmp), report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
