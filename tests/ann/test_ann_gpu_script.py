"""benchmarks/ann_gpu.py runs end to end on small data (its one-GPU run is precious: a broken
script must fail here first)."""

import json


def test_ann_gpu_script_runs_and_reports(tmp_path, capsys, benchmark_script):
    script = benchmark_script("ann_gpu")
    out = tmp_path / "ann-gpu.json"
    args = [
        "--n",
        "3000",
        "--nq",
        "40",
        "--add",
        "1500",
        "--sweep",
        "32",
        "--caps",
        "1,2",
        "--scans",
        "16,64",
        "--phases",
        "16:1:40",
    ]
    # One query batch size: a second compiles every search program again (~25 s here).
    # The fused walk (interpreted here) as on a GPU: its rows first, and its configs in the phases.
    walks = ["--walks", "fused,xla"]
    script.main([*args, "--batch-sizes", "40", "--widths", "1", *walks, "--out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["mode"], r["L"], r["batch"], r.get("cap")) for r in report["rows"]] == [
        ("graph fused", 32, 40, 12),  # the default cap, L // 4 + 4
        ("graph fused", 32, 40, 24),
        ("graph", 32, 40, 12),
        ("graph", 32, 40, 24),
        ("scan", 16, 40, None),
        ("scan", 64, 40, None),
    ]
    assert all(0 <= r["recall@10"] <= 1 and r["qps"] > 0 for r in report["rows"])
    assert report["add"]["points"] == 1500 and report["add"]["points_per_s"] > 0
    phases = report["phases"]
    assert (phases["L"], phases["width"], phases["batch"]) == (16, 1, 40)
    assert set(phases["walk_cut_ms"]) == {"1", "2", "4", "8"}
    assert min(phases["seed_ms"], phases["walk_ms"], phases["rerank_ms"]) > 0
    assert set(phases["walk_fused_ms"]) == {"/".join(map(str, c)) for c in script.FUSED_CONFIGS}
    assert all(phases["walk_fused_equal"].values())
    assert len(phases["walk_fused_equal"]) == len(script.FUSED_CONFIGS)
    # The same lists, so the same results.
    by_mode = {(r["mode"], r.get("cap")): r["recall@10"] for r in report["rows"]}
    assert by_mode["graph fused", 12] == by_mode["graph", 12]
    assert by_mode["graph fused", 24] == by_mode["graph", 24]
    # The exact scan's top 64 codes hold its top 16, so reranked they find at least as many true
    # neighbours (an L = N scan, exact float search, cost this test 15 s more).
    scan16, scan64 = (r["recall@10"] for r in report["rows"][4:])
    assert 0 < scan16 <= scan64
    printed = capsys.readouterr().out
    assert "| scan | 64 | 40 | - |" in printed
    assert "best QPS at recall@10 >= 0.95" in printed and "add: first 1000 points" in printed
