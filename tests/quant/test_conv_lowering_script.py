"""benchmarks/conv_lowering.py runs end to end on tiny layers (its GPU run is precious: a broken
script must fail here first) and checks every lowering against the conv one."""

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_conv_lowering_benchmark_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "conv_lowering_script", os.path.join(REPO, "benchmarks", "conv_lowering.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "conv.json"
    script.main(["--preset", "tiny", "--batch", "2", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * len(script.PRODUCTS)
    for row in rows:
        for lowering in script.LOWERINGS:
            assert row[f"{lowering}_ok"] and row[f"{lowering}_ms"] > 0, row
    assert "| tiny 3x3 s2 | grad_rhs |" in capsys.readouterr().out
