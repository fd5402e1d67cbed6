"""Command line: python -m alijax {train,demo,study,index} ...

python -m alijax train --config configs/digits_resnet.py[:smoke] [--set key=value ...] --workdir DIR
python -m alijax demo [--workdir DIR]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys

# configs/ sits beside the package in the repository (the project installs editable).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "digits_resnet.py")


def load_config(spec: str):
    """Loads `path/to/config.py[:arg]` by calling its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"--config {path!r}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"alijax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    # A config may build on a sibling config (configs/int8_digits.py imports digits_resnet).
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"--config {path!r} must define get_config(arg)")
    return module.get_config(arg or None)


def flat_keys(config, prefix: str = "") -> list[str]:
    """Every leaf key of a ConfigDict, dotted: ["model.name", "seed", ...]."""
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            keys.extend(flat_keys(value, name + "."))
        else:
            keys.append(name)
    return sorted(keys)


def parse_value(text: str):
    """A Python literal when it parses as one (1, 0.5, True, (2, 4)), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, assignments: list[str]):
    """Applies --set key=value pairs; an unknown key is an error listing the valid keys."""
    valid = flat_keys(config)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise SystemExit(f"--set {assignment!r} must look like key=value")
        if key not in valid:
            raise SystemExit(
                f"--set: unknown key {key!r}; valid keys are:\n  " + "\n  ".join(valid)
            )
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        value = parse_value(text)
        if isinstance(node[leaf], float) and isinstance(value, int):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as err:
            raise SystemExit(f"--set {key}: {err}") from None
    return config


def _train(args) -> int:
    from alijax import parallel, train

    parallel.maybe_initialize_distributed()
    config = apply_overrides(load_config(args.config), args.set)
    _, summary = train.train(config, args.workdir, progress=not args.no_progress)
    print(json.dumps(summary))
    print(
        f"test accuracy {summary['test_accuracy']:.4f} after {summary['step']} steps ({args.workdir})"
    )
    return 0


def _study(args) -> int:
    from alijax import study

    config = apply_overrides(load_config(args.config), args.set)
    if "study" not in config:
        raise SystemExit(f"--config {args.config!r} has no 'study' section")
    command = " ".join(
        [
            "python -m alijax study",
            args.kind,
            "--config",
            args.config,
            *(f"--set {a}" for a in args.set),
        ]
    )
    workdir = args.workdir or os.path.join("runs", config.study.name)
    result = study.run_study(config, workdir, command=command, progress=not args.no_progress)
    for method, row in result["methods"].items():
        print(f"{method:18s} {row['test_acc_mean']:.4f} +- {row['test_acc_std']:.4f}")
    print(f"wrote {os.path.join(config.study.results_dir, config.study.name)}.{{json,md,png}}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alijax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train a config, resuming from workdir")
    train_parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    train_parser.add_argument(
        "--workdir", required=True, help="checkpoints, metrics.jsonl, summary.json"
    )
    train_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    train_parser.set_defaults(run=_train)

    demo_parser = commands.add_parser("demo", help="train ResNet-20 on digits (the make demo job)")
    demo_parser.add_argument("--workdir", default="runs/demo")
    demo_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo_parser.add_argument("--no-progress", action="store_true")
    demo_parser.set_defaults(run=_train, config=DEMO_CONFIG)

    study_parser = commands.add_parser("study", help="methods x seeds of a config, one table")
    study_parser.add_argument("kind", choices=["int8"], help="which study")
    study_parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    study_parser.add_argument("--workdir", default=None, help="default: runs/<study name>")
    study_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    study_parser.add_argument("--no-progress", action="store_true")
    study_parser.set_defaults(run=_study)

    from alijax.ann.cli import add_index_commands

    add_index_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
