"""benchmarks/ann_gpu.py runs end to end on small data (its one-GPU run is precious: a broken
script must fail here first)."""

import json


def test_ann_gpu_script_runs_and_reports(tmp_path, capsys, benchmark_script):
    script = benchmark_script("ann_gpu")
    out = tmp_path / "ann-gpu.json"
    args = ["--n", "3000", "--nq", "40", "--add", "1500", "--sweep", "16,32"]
    script.main([*args, "--batch-sizes", "40,16", "--widths", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["L"], r["batch"]) for r in report["rows"]] == [
        (16, 40),
        (32, 40),
        (16, 16),
        (32, 16),
    ]
    assert all(0 <= r["recall@10"] <= 1 and r["qps"] > 0 for r in report["rows"])
    assert report["add"]["points"] == 1500 and report["add"]["points_per_s"] > 0
    printed = capsys.readouterr().out
    assert "best QPS at recall@10 >= 0.95" in printed and "add: first 1000 points" in printed
