"""benchmarks/gpu_lowering.py lowers every recipe's train step for a Hopper GPU on CPU: the GPU
path (int8 GEMMs through Pallas, Mosaic configs for Hopper) is checked here, where CI runs,
before scarce device time is spent on it."""

import re

import jax


def test_recipes_lower_for_cuda_with_one_kernel_per_gemm_shape(capsys, benchmark_script):
    script = benchmark_script("gpu_lowering")
    assert script.main(["--quick", "--recipes", "bf16,da_int8+im2col"]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out
    assert next(row for row in out.splitlines() if row.startswith("bf16 ")).endswith("none")
    # im2col puts every conv product on int8_matmul: Mosaic where K >= 256, Triton below. The
    # forward and the backward trace some GEMMs of the same shapes from different call paths;
    # the kernels' source locations are pinned (caller_independent_locations), so each shape
    # lowers to one kernel body, compiled once on the GPU (unpinned, the tiny model's step held
    # 9 Mosaic bodies for 5 shapes and 12 Triton bodies for 10).
    line = next(row for row in out.splitlines() if row.startswith("da_int8+im2col "))
    counts = dict(re.findall(r"(mosaic|triton) (\d+ / \d+ / \d+)", line))
    assert set(counts) == {"mosaic", "triton"}, line
    for backend, count in counts.items():
        calls, bodies, shapes = map(int, count.split(" / "))
        assert calls >= bodies == shapes, (backend, line)


def test_hopper_choices_are_undone_after(benchmark_script):
    script = benchmark_script("gpu_lowering")
    with script.as_if_on_hopper():
        assert jax.default_backend() == "gpu"
    assert jax.default_backend() == "cpu"


def test_pallas_kernels_counted_by_backend(benchmark_script):
    script = benchmark_script("gpu_lowering")
    text = "\n".join(
        [
            '%0 = stablehlo.custom_call @mosaic_gpu(%a) {backend_config = "kernel A"}',
            '%1 = stablehlo.custom_call @mosaic_gpu(%b) {backend_config = "kernel A"}',
            '%2 = stablehlo.custom_call @__gpu$xla.gpu.triton(%c) {backend_config = "B"}',
            '%3 = stablehlo.custom_call @Sharding(%d) {backend_config = "C"}',
        ]
    )
    text += "\n" + (
        '%4 = stablehlo.custom_call @mosaic_gpu_v2(%e, %f) {backend_config = "D"} : '
        "(tensor<8x32xi8>, tensor<16x32xi8>) -> tensor<8x16xi32>"
    )
    # Calls, distinct bodies, distinct types ("?" for the calls without types here).
    assert script.pallas_kernels_in(text) == {"mosaic": (3, 2, 2), "triton": (1, 1, 1)}
    # One line per distinct (backend, types); calls without types print as "?".
    assert script.pallas_kernel_list(text) == [
        "mosaic (tensor<8x32xi8>, tensor<16x32xi8>) -> tensor<8x16xi32>",
        "mosaic ?",
        "triton ?",
    ]
