"""Test set-up: 8 simulated CPU devices, so sharded code is tested for real.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives at the top of
the root conftest and why no test module imports jax at collection time before it.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

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
        spec.loader.exec_module(script)
        return script

    return load
