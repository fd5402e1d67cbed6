"""benchmarks/kernels.py keeps what it measured when gpu_suite.sh's timeout stops it: the table
and the JSON were written only at the end, so a run past BENCH_TIMEOUT left neither."""

import json
import os
import signal

import pytest


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
def test_a_sigterm_still_prints_and_writes_the_rows_so_far(tmp_path, capsys, benchmark_script):
    script = benchmark_script("kernels")

    def measured_then_stopped(args, on_gpu, deadline):
        script.ROWS.append(script.Row("hamming_topk", "Q=1 N=8", "ours", "xla", "Gpairs/s", 2.0))
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` sends it

    def never(*args):
        raise AssertionError("the matmul suite ran after the stop")

    script.hamming_suite, script.matmul_suite = measured_then_stopped, never
    previous = signal.getsignal(signal.SIGTERM)
    try:
        script.main(["--quick", "--out", str(tmp_path / "k.json")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = json.loads((tmp_path / "k.json").read_text())
    assert report["stopped"].startswith(f"stopped by signal {int(signal.SIGTERM)}")
    assert [r["op"] for r in report["rows"]] == ["hamming_topk"]
    assert "Q=1 N=8" in capsys.readouterr().out  # the table, printed
