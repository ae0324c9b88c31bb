"""Building the CPU kernels' C sources: on first use, with the machine's C compiler, one variant per instruction set,
cached under K2_HOME, loaded through ctypes; and which variants this CPU runs.

Plain C through ctypes rather than a torch C++ extension: a C file compiles in about a second where one against
torch's headers takes a minute, needs no build step at `pip install`, and the kernels take nothing from torch but
pointers. Their OpenMP threads come from the libgomp torch already loaded (the same soname), so the kernels and torch
share one thread pool, sized by torch.get_num_threads().
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from runtime.errors import K2Error

# Variants, best first, with the compiler flags that build them and the CPU flags (/proc/cpuinfo) they need.
VARIANTS = {
    "avx512vnni": (["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
                   {"avx512f", "avx512bw", "avx512_vnni", "avx2", "fma", "f16c"}),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "scalar": ([], set()),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (Linux's /proc/cpuinfo); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def runnable_variants() -> tuple[str, ...]:
    """The variants this CPU can run, best first (x86 flags checked; elsewhere the portable one). Read once: every
    INT4 forward on the CPU asks."""
    flags = cpu_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    return tuple(name for name, (_, needs) in VARIANTS.items() if not needs or (x86 and needs <= flags))


def _cache_dir() -> Path:
    from runtime.resolve import k2_cache_dir

    return k2_cache_dir() / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(source: Path, variant: str) -> Path:
    """`source` built as `variant`'s shared library, compiled now unless a build of this source with these flags is
    cached."""
    compiler = _compiler()
    if compiler is None:
        raise K2Error("no C compiler found (install gcc, or set CC)")
    flags, _ = VARIANTS[variant]
    base = ["-O3", "-std=c11", "-fPIC", "-shared", *flags]
    text = source.read_bytes()
    for openmp in (["-fopenmp"], []):  # Apple's clang has no OpenMP: then one thread
        key = hashlib.sha256(text + " ".join([compiler, *base, *openmp, platform.machine()]).encode()).hexdigest()
        target = _cache_dir() / f"{source.stem}-{variant}-{key[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *base, *openmp, str(source), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)  # whole or absent: another process may be building the same
                return target
            error = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
    raise K2Error(f"{compiler} could not build {source.name} for {variant}: {error}")


def load(source: Path, variant: str) -> ctypes.CDLL:
    return ctypes.CDLL(str(build(source, variant)))
