import json
import os

import pytest

from alijax.__main__ import REPO_ROOT, apply_overrides, flat_keys, load_config, main

SMOKE = os.path.join(REPO_ROOT, "configs", "digits_resnet.py") + ":smoke"


def test_set_overrides_nested_and_typed_values():
    config = apply_overrides(
        load_config(SMOKE), ["optimizer.learning_rate=0.05", "num_steps=7", "mesh_shape=(2, 4)"]
    )
    assert config.optimizer.learning_rate == 0.05 and config.num_steps == 7
    assert tuple(config.mesh_shape) == (2, 4)


def test_set_int_into_float_field_is_accepted():
    config = apply_overrides(load_config(SMOKE), ["optimizer.learning_rate=1"])
    assert config.optimizer.learning_rate == 1.0 and isinstance(
        config.optimizer.learning_rate, float
    )


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(SystemExit) as err:
        apply_overrides(load_config(SMOKE), ["optimiser.lr=0.1"])
    message = str(err.value)
    assert "unknown key 'optimiser.lr'" in message
    for key in flat_keys(load_config(SMOKE)):
        assert key in message


def test_wrong_type_is_an_error():
    with pytest.raises(SystemExit, match="num_steps"):
        apply_overrides(load_config(SMOKE), ["num_steps=many"])


def test_bad_config_arg_and_path():
    with pytest.raises(ValueError, match="smok"):
        load_config(SMOKE[:-1])
    with pytest.raises(SystemExit, match="no such file"):
        load_config("configs/nope.py")


def test_train_command_end_to_end(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--config",
                SMOKE,
                "--set",
                "num_steps=4",
                "--set",
                "log_every=2",
                "--workdir",
                workdir,
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "test accuracy" in out
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["step"] == 4 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert json.load(open(os.path.join(workdir, "config.json")))["num_steps"] == 4


def test_index_commands_are_hooked_in():
    from alijax.__main__ import build_parser

    args = build_parser().parse_args(["index", "build", "--input", "x.fvecs", "--out", "idx"])
    assert args.command == "index" and args.index_command == "build" and callable(args.run)
