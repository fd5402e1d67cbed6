"""Command line: python -m alijax {train,demo,index} ...

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
    module_spec.loader.exec_module(module)
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

    from alijax.ann.cli import add_index_commands

    add_index_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
