"""hf_fastinfer's compiled CPU kernels (``kernels/cpu/``: one op per .cpp file, shared SIMD helpers in
``simd.h``, the Python bindings in ``module.cpp``), built on first use for this machine into one extension.

``torch.utils.cpp_extension.load`` compiles the sources once (a minute or two) with ``-O3 -march=native`` into
torch's extension cache and loads it from there afterwards; a changed source is rebuilt. Without a C++ compiler or ninja the ops fall
back to their portable PyTorch paths, with one warning. ``HF_FASTINFER_NO_CPU_EXT=1`` skips the build.

``HF_FASTINFER_CPU_ARCH`` names another ``-march`` target (``x86-64-v3``: AVX2 + FMA, no AVX-512; ``x86-64``: the
portable scalar loops), built as a separate extension beside the native one: for a machine image shared by
several CPU kinds, and for the tests, which check each SIMD road a host can run (:func:`simd_road` says which
one a build took).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

_SOURCE_DIR = Path(__file__).with_name("cpu")
#: the extension's name (and its folder in torch's extension cache)
_NAME = "hf_fastinfer_cpu"
_lock = threading.Lock()
_state: dict = {}


#: a build takes about a minute; a lock file older than this was left by a process killed mid-build
STALE_LOCK_SECONDS = 600


def _clear_stale_lock(lock: Path) -> None:
    """torch's extension builder waits, without end, for the lock file of another process's build to go
    away; a process killed while compiling (an interrupted notebook cell) leaves it behind for good."""
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(f"hf_fastinfer: removing a stale build lock ({lock}, {age / 60:.0f} minutes old) left by an "
                      "interrupted compile", RuntimeWarning, stacklevel=3)
        lock.unlink(missing_ok=True)


def target_arch() -> str:
    """The ``-march`` the kernels are built for: ``$HF_FASTINFER_CPU_ARCH``, or ``native`` (this machine's CPU)."""
    arch = os.environ.get("HF_FASTINFER_CPU_ARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", arch):
        raise ValueError(f"HF_FASTINFER_CPU_ARCH={arch!r} is not a -march name (for example x86-64-v3)")
    return arch


def _extension_name(suffix: str = "") -> str:
    """The extension's name in torch's cache: one per target, so that builds for two targets never replace each
    other."""
    arch = target_arch()
    return _NAME + ("" if arch == "native" else "_" + re.sub(r"[^A-Za-z0-9]", "_", arch)) + suffix


def _build(name: str, defines: tuple[str, ...] = ()):
    """Compile (or load from torch's extension cache) the sources as extension ``name``."""
    from torch.utils.cpp_extension import _get_build_directory, load

    arch = target_arch()

    build_dir = Path(_get_build_directory(name, False))
    built = build_dir / f"{name}.so"
    _clear_stale_lock(build_dir / "lock")
    if not built.exists():
        target = "this machine" if arch == "native" else f"-march={arch}"
        print(f"hf_fastinfer: compiling the CPU kernels for {target} (once, a minute or two)...",
              file=sys.stderr, flush=True)
    return load(
        name=name,
        sources=[str(p) for p in sorted(_SOURCE_DIR.glob("*.cpp"))],
        # -fopenmp: at::parallel_for is an OpenMP loop inlined from ATen's headers (and the fused
        # kernels' parallel regions are OpenMP); without the flag they silently run on one thread.
        # -ffp-contract=off: scalar code rounds each product as torch's elementwise ops do (the GEMV
        # loops use explicit FMA instructions).
        extra_cflags=["-O3", f"-march={arch}", "-fopenmp", "-ffp-contract=off", *(f"-D{d}" for d in defines)],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def cpu_extension():
    """The loaded extension module, or None when it cannot be built here."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if os.environ.get("HF_FASTINFER_NO_CPU_EXT") != "1":
            try:
                module = _build(_extension_name())
            except Exception as exc:  # no compiler, no ninja, unsupported flags ...
                warnings.warn(
                    f"hf_fastinfer: could not build the CPU kernels ({type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}); using the slower "
                    "portable path. Install a C++ compiler and `pip install ninja` to enable it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _state["module"] = module
        return module


def use_phase_profiling_build():
    """Build the kernels with their per-phase cycle counters (``kernels/cpu/phases.h``) and make that build the
    one this process uses; returns it. For ``benchmarks/profile_decode.py``: it must run before anything in the
    process has used the compiled kernels (two builds cannot both be loaded: they register the same classes)."""
    with _lock:
        if _state.get("module") is not None and not hasattr(_state["module"], "phase_cycles"):
            raise RuntimeError("the compiled kernels are already loaded in this process; profile in a new one")
        if _state.get("module") is None:
            _state["module"] = _build(_extension_name("_phases"), ("HF_FASTINFER_PHASES",))
        return _state["module"]
