"""benchmarks/profile_build.py profiles a build stage end to end on small codes, and attributes
its op time to graph.py's steps (the named scopes) and to source lines."""

import numpy as np


def test_scope_path_keeps_scopes_and_alijax_functions(benchmark_script):
    script = benchmark_script("profile_build")
    path = script._scope_path
    knn = (
        "jit(_initial_stage)/merge_blocks_by_group/while/body/closed_call/vmap(block_knn_keys)/min"
    )
    assert path(knn) == "merge_blocks_by_group/block_knn_keys"
    topk = "jit(_initial_stage)/partition/jit(hamming_topk_chunked)/while/body/xor"
    assert path(topk) == "partition/hamming_topk_chunked"
    # jax's own jitted helpers fold into the step that called them
    assert path("jit(_propagate_stage)/propagate_keys/jit(_where)/select") == "propagate_keys"
    assert path("jit(_initial_stage)/mul") == "(no scope)"


def test_profile_build_script_reports_steps_and_lines(tmp_path, capsys, benchmark_script):
    script = benchmark_script("profile_build")
    rng = np.random.default_rng(0)
    words = lambda n: rng.integers(0, 2**32, (n, 8), dtype=np.uint64).astype(np.uint32)  # noqa: E731
    # 3000 codes around 8 centres, each bit flipped with probability 1/4
    codes = words(8)[rng.integers(0, 8, 3000)] ^ (words(3000) & words(3000))
    np.save(tmp_path / "codes.npy", codes)
    args = ["--codes", str(tmp_path / "codes.npy"), "--stage", "initial", "--top", "50"]
    script.main([*args, "--trace-dir", str(tmp_path / "trace")])
    out = capsys.readouterr().out
    steps = out.split("by step:")[1].split("by source line:")[0]
    assert "merge_blocks_by_group/block_knn_keys_narrow" in steps  # 256 slots a block
    assert "partition" in steps
    lines = out.split("by source line:")[1]
    assert "graph.py:" in lines and "bitonic.py:" in lines


def test_coverage_warning_when_the_trace_lost_ops(benchmark_script):
    # 1M codes, --stage initial: 2.97 s of ops in a 6.23 s stage (the trace's million events
    # ran out); 200k: 1.41 s of ops on two threads in 1.07 s.
    profile_build = benchmark_script("profile_build")
    assert profile_build.coverage_warning(2.97, 6.23).startswith("warning: the trace holds 2.97 s")
    assert profile_build.coverage_warning(1.41, 1.07) is None
