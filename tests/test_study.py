"""The INT8 study end to end on tiny data: digits (smoke) and CIFAR-10 files the test writes."""

import json
import os

import numpy as np

from alijax import study
from alijax.__main__ import REPO_ROOT, load_config
from alijax.data.cifar import write_cifar10


def test_cifar10_study_runs_on_files_in_the_official_binary_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", 8) for i in range(1, 6)] + [("test_batch.bin", 16)]:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        write_cifar10(folder / name, images, rng.integers(0, 10, n).astype(np.uint8))
    config = load_config(os.path.join(REPO_ROOT, "configs", "int8_cifar10.py") + ":smoke")
    config.dataset.root = str(folder)
    config.study.results_dir = str(tmp_path / "results")
    result = study.run_study(config, str(tmp_path / "runs"), command="test")

    assert set(result["methods"]) == {"fp32", "da_int8"}
    for row in result["methods"].values():
        assert 0.0 <= row["test_acc_mean"] <= 1.0 and len(row["test_accs"]) == 1
    saved = json.load(open(tmp_path / "results" / "int8_cifar10_smoke.json"))
    assert (
        saved["methods"]["da_int8"]["test_acc_mean"]
        == result["methods"]["da_int8"]["test_acc_mean"]
    )
    assert (tmp_path / "results" / "int8_cifar10_smoke.md").read_text().count("| da_int8 |") >= 1
    assert (tmp_path / "results" / "int8_cifar10_smoke_accuracy.png").stat().st_size > 0
    # DA-INT8 logged per-layer telemetry; fp32 has none.
    assert result["layers"] and all("fp32" not in m for m in result["layers"].values())


def test_layer_telemetry_and_mcs_check_by_hand():
    records = [
        {"step": 1, "loss": 1.0, "quant/a/conv/mcs_objective": 1.0, "quant/a/conv/grad_cos": 0.9},
        {"step": 2, "loss": 1.0, "quant/a/conv/mcs_objective": 3.0, "quant/a/conv/grad_cos": 0.7},
    ]
    assert study.layer_telemetry(records) == {"a/conv": {"mcs_objective": 2.0, "grad_cos": 0.8}}
    layers = {
        "l1": {
            "da_int8": {"mcs_objective": 1.0, "mcs_objective_maxabs": 2.0},
            "per_tensor_int8": {"mcs_objective": 1.5},
        },
        "l2": {
            "da_int8": {"mcs_objective": 3.0, "mcs_objective_maxabs": 2.0},
            "per_tensor_int8": {"mcs_objective": 2.5},
        },
    }
    assert study.mcs_check(layers) == {
        "layers": 2,
        "below_per_tensor_int8_run": 1,
        "below_maxabs_on_same_gradients": 1,
    }
