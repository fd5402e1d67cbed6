"""Test set-up: 8 simulated CPU devices, so sharded code is tested for real.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives at the top of
the root conftest and why no test module imports jax at collection time before it.
"""

import atexit
import os
import shutil
import sys
import tempfile

_xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Compiling, not running, is most of this suite's time: its data are small. LLVM at -O0 (XLA's
# HLO passes, buffer assignment and the programs' semantics are unchanged; only the machine code
# is less optimised) took tests/ann/test_graph.py from 205 to 126 s (2 workers, 2026-12-06).
# A flag the environment already sets is kept: XLA_FLAGS=--xla_backend_optimization_level=3
# runs the suite as users run the code. Not where a GPU may be (XLA's GPU backend reads the
# same flag for its LLVM code, and the gpu tests' short runs there are timed by the suite).
_may_have_gpu = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
if "--xla_backend_optimization_level" not in _xla_flags and not _may_have_gpu:
    _xla_flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _xla_flags.strip()

# One persistent compilation cache for the run, shared by every process it starts (pytest-xdist
# workers, the command-line and multi-process tests' subprocesses, notebooks: they inherit the
# environment): many tests compile the same index and train-step programs. tests/ann alone,
# 2 workers on 2 cores (2026-12-06): 10:43 -> 8:39 wall, 20:47 -> 14:12 of CPU. A directory
# of its own per run (removed at exit), so no run reads another's programs, unless the
# environment names one (then that cache is used, and kept).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="alijax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def benchmark_script():
    """Loads benchmarks/<name>.py as a module (benchmarks is not a package): the scripts whose
    GPU runs are precious are run end to end on small inputs first."""
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def load(name: str):
        path = os.path.join(repo, "benchmarks", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"{name}_script", path)
        script = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = script  # (a dataclass of the script looks its module up there)
        spec.loader.exec_module(script)
        return script

    return load
