"""benchmarks/ann.py reads and checks a user's vector files before its built-in data sets run."""

import numpy as np
import pytest

from alijax.data.vecs import write_fvecs


def test_user_files_checked_before_the_built_in_runs(tmp_path, benchmark_script, monkeypatch):
    script = benchmark_script("ann")
    ran = []
    monkeypatch.setattr(script, "bench", lambda name, *a: ran.append(name))
    rng = np.random.default_rng(0)
    write_fvecs(tmp_path / "base.fvecs", rng.normal(size=(300, 16)).astype(np.float32))
    write_fvecs(tmp_path / "q8.fvecs", rng.normal(size=(20, 8)).astype(np.float32))
    small = ["--n", "2000", "--nq", "20", "--no-digits", "--methods", "ours"]
    with pytest.raises(ValueError, match="--queries .*q8.fvecs: dimension 8, --fvecs has 16"):
        script.main(
            [
                *small,
                "--fvecs",
                str(tmp_path / "base.fvecs"),
                "--queries",
                str(tmp_path / "q8.fvecs"),
            ]
        )
    with pytest.raises(ValueError, match="300 rows, not more than --nq 1000"):
        script.main(
            [*small[:2], "--nq", "1000", "--no-digits", "--fvecs", str(tmp_path / "base.fvecs")]
        )
    with pytest.raises(FileNotFoundError, match="missing.fvecs"):
        script.main([*small, "--fvecs", str(tmp_path / "missing.fvecs")])
    with pytest.raises(ValueError, match="give --fvecs too"):
        script.main([*small, "--queries", str(tmp_path / "q8.fvecs")])
    assert ran == []  # nothing ran before the bad file was found
    x, q = script.user_data(str(tmp_path / "base.fvecs"), None, 20)
    assert x.shape == (280, 16) and q.shape == (20, 16)
    script.main([*small, "--fvecs", str(tmp_path / "base.fvecs")])
    assert ran == ["synthetic2k", "base"]
