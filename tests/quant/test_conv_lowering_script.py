"""benchmarks/conv_lowering.py runs end to end on tiny layers (its GPU run is precious: a broken
script must fail here first) and checks every lowering against the conv one."""

import json


def test_conv_lowering_benchmark_runs(tmp_path, capsys, benchmark_script):
    script = benchmark_script("conv_lowering")
    out = tmp_path / "conv.json"
    script.main(["--preset", "tiny", "--batch", "2", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    dense = [row for row in rows if row["layer"] == "dense G_W"]
    rows = [row for row in rows if row["layer"] != "dense G_W"]
    assert len(rows) == 2 * len(script.PRODUCTS) and len(dense) == 1
    assert dense[0]["ok"] and dense[0]["int8_dot_ms"] > 0
    for row in rows:
        for lowering in script.LOWERINGS:
            assert row[f"{lowering}_ok"] and row[f"{lowering}_ms"] > 0, row
    assert "| tiny 3x3 s2 | grad_rhs |" in capsys.readouterr().out
