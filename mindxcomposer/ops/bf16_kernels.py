"""Builds and wraps the CPU kernels of `csrc/bf16_kernels.cc` (bf16 weights x fp32 activations).

The shared library is compiled from the package's own source with the machine's g++ the first time it
is needed (about 2 s), with `-march=native` and OpenMP, into a cache directory keyed by the source,
the compiler flags and the CPU's feature flags, so it is built once per machine and never downloaded.
`python -m mindxcomposer.ops.bf16_kernels` builds it ahead of time and prints where it is.

Where it cannot be built (no g++), `available()` is False and the portable path (cast the weight to
fp32, then MatMul / Gather) serves instead; `MXC_PORTABLE_KERNELS=1` forces that path.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Optional

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "bf16_kernels.cc")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++14"]
_lock = threading.Lock()
_state = {"path": None, "error": None, "ops": None}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def cache_dir() -> str:
    base = os.environ.get("MXC_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mindxcomposer")
    return os.path.join(base, "kernels")


def library_path() -> str:
    with open(_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(_FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"mxc_bf16_{key}.so")


def build(force: bool = False) -> str:
    """Compile the library if it is not cached; returns its path. Raises RuntimeError if it cannot."""
    path = library_path()
    if os.path.isfile(path) and not force:
        return path
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found to build the bf16 CPU kernels")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *_FLAGS, "-o", tmp, _SOURCE], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the bf16 CPU kernels failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent process sees no half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def available() -> bool:
    """True when the kernels are usable here: a CPU device target and a library built (or buildable)."""
    import mindspore as ms

    if os.environ.get("MXC_PORTABLE_KERNELS") == "1" or ms.get_context("device_target") != "CPU":
        return False
    with _lock:
        if _state["path"] is None and _state["error"] is None:
            try:
                _state["path"] = build()
            except (RuntimeError, OSError) as e:
                _state["error"] = str(e)
        return _state["path"] is not None


def custom_ops():
    """(linear, embedding) `ops.Custom` primitives, or None when not `available()`."""
    if not available():
        return None
    with _lock:
        if _state["ops"] is None:
            import mindspore as ms
            from mindspore import ops

            lib = _state["path"]
            linear = ops.Custom(f"{lib}:MxcLinearBf16", out_shape=lambda x, w: list(x[:-1]) + [w[0]],
                                out_dtype=lambda x, w: ms.float32, func_type="aot")
            embedding = ops.Custom(f"{lib}:MxcEmbeddingBf16", out_shape=lambda i, t: list(i) + [t[1]],
                                   out_dtype=lambda i, t: ms.float32, func_type="aot")
            _state["ops"] = (linear, embedding)
        return _state["ops"]


def unavailable_reason() -> Optional[str]:
    return _state["error"]


if __name__ == "__main__":
    try:
        print(build(force="--force" in sys.argv))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
