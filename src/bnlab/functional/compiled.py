"""bnlab's compiled CPU kernels (``csrc/``), built on first use for the machine they run on.

The C++ sources are compiled with torch's extension builder (ninja, the system
C++ compiler, ``-O3 -march=native -fopenmp``) into a cache directory the first
time a kernel is needed (about 10 s), then loaded from the cache. The build
directory is keyed by a hash of the sources, the flags and torch's exact version,
and by this CPU's instruction-set flags (``/proc/cpuinfo``), so a cache shared
between machines never hands one CPU another's binary. (Apple clang and MSVC
reject the flags: there the torch path is used, after one warning per process.)

Every caller has a pure-torch path to fall back on: when the build is
impossible (no compiler, no ninja) or disabled, :func:`load_kernels` returns
False after one warning, and the functional layer takes its ATen-based path.

Environment:
    ``BNLAB_COMPILED_KERNELS=0`` disables the compiled kernels.
    ``BNLAB_KERNEL_CACHE`` sets the build cache (default
    ``$XDG_CACHE_HOME/bnlab/kernels`` or ``~/.cache/bnlab/kernels``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import torch

from bnlab._paths import user_cache_path

__all__ = ["load_kernels", "build_extension", "kernel_status"]

_SOURCES = [Path(__file__).parent / "csrc" / "ghost_batch_norm.cpp"]
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cpu_signature() -> str:
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def _cache_dir() -> Path:
    """``$BNLAB_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/bnlab/kernels``, else ``~/.cache/bnlab/kernels``."""
    return user_cache_path("kernels", env="BNLAB_KERNEL_CACHE")


def _ensure_ninja_on_path() -> None:
    # torch's builder runs `ninja` from PATH; the PyPI wheel installs it into the environment's
    # bin/, which is not on PATH when the interpreter is called by its full path.
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_key(sources: list[Path], cflags: list[str]) -> str:
    """What a binary depends on: the sources, the flags, torch's exact build and this CPU."""
    h = hashlib.sha256()
    for source in sources:
        h.update(source.read_bytes())
    h.update(" ".join(cflags).encode())
    h.update(torch.__version__.encode())
    return f"{h.hexdigest()[:10]}_{_cpu_signature()}"


@contextlib.contextmanager
def _exclusive(build_dir: Path):
    """Hold bnlab's own lock on the build directory. torch's builder uses a lock *file* and waits for
    it without a timeout, so one left by a build that was killed would block every later process;
    under this kernel-held lock (released when its holder dies) no other builder is running, and a
    torch lock file still present is such a leftover."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file only
        yield
        return
    with open(build_dir / "bnlab.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        leftover = build_dir / "lock"
        if leftover.exists():
            warnings.warn(f"removing a build lock left by a killed build: {leftover}", RuntimeWarning, stacklevel=5)
            leftover.unlink(missing_ok=True)
        yield


def _build_dir(name: str, sources: list[Path], cflags: tuple[str, ...] = ()) -> tuple[str, Path]:
    """The extension's full name and its build directory for these sources, flags, torch and CPU."""
    full_name = f"{name}_{_build_key(sources, _CFLAGS + list(cflags))}"
    return full_name, _cache_dir() / full_name


def _build(name: str, sources: list[Path], cflags: tuple[str, ...] = ()) -> None:
    from torch.utils import cpp_extension

    _ensure_ninja_on_path()
    flags = _CFLAGS + list(cflags)
    full_name, build_dir = _build_dir(name, sources, cflags)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(build_dir):
        cpp_extension.load(name=full_name, sources=[str(s) for s in sources], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False,
                           verbose=False)


def _first_error(exc: Exception) -> str:
    """The compiler's first error line if the message has one, else the message's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [repr(exc)])[0][:300]


def build_extension(name: str, sources: list[Path], ops: tuple[str, ...], cflags: tuple[str, ...] = ()) -> bool:
    """Build (once per machine) and load a C++ extension that registers ``ops`` (``"namespace::op"``)
    with torch, compiled with ``-O3 -march=native -fopenmp`` plus ``cflags``; True when they are all
    there. Any failure warns once and returns False, so callers keep a torch fallback. Later calls
    return the first answer."""
    if name in _state:
        return _state[name]
    with _lock:
        if name in _state:
            return _state[name]
        if os.environ.get("BNLAB_COMPILED_KERNELS", "1") == "0":  # the user's choice: no warning
            _state[name] = False
            return False
        try:
            _build(name, sources, cflags)
            missing = [op for op in ops if not hasattr(getattr(torch.ops, op.split("::")[0]), op.split("::")[1])]
            if missing:
                raise RuntimeError(f"the build succeeded but does not register {', '.join(missing)}")
            _state[name] = True
        except Exception as exc:  # any build failure means: use the torch path
            warnings.warn(
                f"bnlab could not build its compiled CPU kernels ({type(exc).__name__}: {_first_error(exc)}); "
                "falling back to the slower torch path. A C++ compiler and the 'ninja' package are needed; "
                "set BNLAB_COMPILED_KERNELS=0 to silence this.",
                RuntimeWarning, stacklevel=3)
            _state[name] = False
        return _state[name]


def kernel_status() -> dict:
    """What is built for this machine, without building anything: the library's path, whether it
    exists, whether this process has loaded it, and what it is keyed by."""
    full_name, build_dir = _build_dir("bnlab_kernels", _SOURCES)
    library = build_dir / f"{full_name}.so"
    return {"library": str(library), "built": library.is_file(), "loaded": _state.get("bnlab_kernels"),
            "cpu": f"{platform.machine()} (instruction-set signature {_cpu_signature()})",
            "torch": torch.__version__, "flags": " ".join(_CFLAGS),
            "disabled": os.environ.get("BNLAB_COMPILED_KERNELS", "1") == "0"}


def load_kernels() -> bool:
    """Build (once per machine) and load the normalization kernels; True when ``torch.ops.bnlab`` has them."""
    return build_extension("bnlab_kernels", _SOURCES,
                           ("bnlab::ghost_forward", "bnlab::ghost_backward", "bnlab::renorm_forward",
                            "bnlab::bn_train_forward", "bnlab::bn_train_backward", "bnlab::batch_norm_train"))


# torch.compile calls load_kernels once while tracing and keeps the answer (tracing cannot enter the
# build's lock). This attribute is all torch.compiler.assume_constant_result sets; set directly, so that
# importing bnlab does not import torch._dynamo (a second, and its optional-dependency probes).
# tests/test_compiled_batch_norm.py compiles with fullgraph=True in a fresh process to keep this honest.
load_kernels._dynamo_marked_constant = True
