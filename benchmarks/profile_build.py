"""Where one stage of the graph build spends its time, summed by step and by source line.

  python benchmarks/profile_build.py [--n 1000000] [--stage initial|propagate|finalize]
                                     [--top 40] [--codes CODES.npy] [--trace-dir DIR]

Builds the clustered synthetic data of benchmarks/ann.py (or loads packed uint32 codes [n, W]
from --codes), encodes them with ITQ as an index build does, runs the stages before the chosen
one, then runs the chosen stage once under `jax.profiler.trace` and prints the seconds its ops
took, summed two ways:
- by step: the path of named scopes in the op's op_name (graph.py puts each step's function
  under a jax.named_scope of its name, e.g. "merge_blocks_by_group/block_knn_keys");
- by source line: the alijax line that emitted the op (innermost frame first, then its caller).

The line of an op comes from the compiled HLO: each instruction's metadata names a
`stack_frame_id` in the module's StackFrames table, whose entries point into FileLocations
(file, function, line). Only the innermost frames are reliable: the parent links do not form
whole call chains (not even with JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS=1, jax 0.10.2). Ops
with no frame fall back to their op_name. A profile is a share of one run, not a timing: the
profiler adds a few percent, and this machine's speed swings within minutes.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import importlib.util
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alijax.ann import codes as codes_lib  # noqa: E402
from alijax.ann import graph  # noqa: E402
from alijax.ann import hamming as hamming_lib  # noqa: E402

_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", re.M)
_ALIJAX_FILE = re.compile(r"(?:^|/)alijax/")


def _hlo_tables(hlo: str) -> dict[str, dict[int, str]]:
    """The four stack-frame tables printed after the module: {table: {id: text}}."""
    tables, current = {}, None
    for line in hlo.splitlines():
        if line in _TABLES:
            current = tables.setdefault(line, {})
            continue
        if current is None or not line.strip():
            continue
        head, _, rest = line.partition(" ")
        if not head.isdigit():
            current = None  # past the tables
            continue
        current[int(head)] = rest
    return tables


def _frame_chains(hlo: str):
    """A function: stack_frame_id -> its frames' "file:function:line", innermost first."""
    tables = _hlo_tables(hlo)
    if "StackFrames" not in tables:
        return lambda frame: []
    fields = lambda text: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}  # noqa: E731
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    locations = {}
    for k, text in tables["FileLocations"].items():
        f = fields(text)
        locations[k] = (files[f["file_name_id"]], functions[f["function_name_id"]], f["line"])
    parents = {k: fields(text) for k, text in tables["StackFrames"].items()}

    def chain(frame: int) -> list[str]:
        out, seen = [], set()
        while frame in parents and frame not in seen:
            seen.add(frame)
            path, function, line = locations[parents[frame]["file_location_id"]]
            where = f"{os.path.basename(path)}:{function}:{line}"
            if _ALIJAX_FILE.search(path) and (not out or out[-1] != where):
                out.append(where)
            frame = parents[frame].get("parent_frame_id", 0)
        return out

    return chain


# op_name components that are not named scopes: jax's control flow and transformations
# (vmap(f), jit(f) and the like keep f where f is an alijax function or scope; jax's own
# jitted helpers, jit(_where), jit(floor_divide), are folded into the step that called them).
_NOT_A_SCOPE = re.compile(
    r"^(pjit|while|body|cond|closed_call|core_call|shard_map|checkpoint|remat)$"
)
_WRAPPED = re.compile(r"^\w+\((.*)\)$")


@functools.lru_cache(maxsize=None)
def _alijax_functions() -> frozenset[str]:
    """The names of alijax.ann's functions, and the scopes graph._scoped gives its steps (the
    name without leading underscores)."""
    names = set()
    for module in (graph, graph.search_lib, graph.bitonic, hamming_lib):
        functions = {k: v for k, v in vars(module).items() if callable(v)}
        names.update(functions)
        names.update(k.strip("_") for k, v in functions.items() if hasattr(v, "__wrapped__"))
    return frozenset(names)


def _scope_path(op_name: str) -> str:
    """ "jit(stage)/partition/while/body/closed_call/vmap(nearest_centroids)/min" -> the named
    scopes and jitted alijax functions under the stage's own jit, "partition/
    nearest_centroids" (the last component is the primitive)."""
    parts = []
    for part in op_name.split("/")[1:-1]:
        wrapped = _WRAPPED.match(part)
        if wrapped:
            part = wrapped.group(1)
            if part not in _alijax_functions():
                continue
        if not _NOT_A_SCOPE.match(part) and (not parts or parts[-1] != part):
            parts.append(part)
    return "/".join(parts) or "(no scope)"


def steps(hlo: str) -> dict[str, str]:
    """Every HLO instruction name -> the named scopes it ran under (see _scope_path)."""
    where = {}
    for match in _INSTRUCTION.finditer(hlo):
        name, metadata = match.groups()
        op = re.search(r'op_name="([^"]*)"', metadata)
        where[name] = _scope_path(op.group(1)) if op else "(no scope)"
    return where


def source_lines(hlo: str, depth: int = 2) -> dict[str, str]:
    """Every HLO instruction name -> where alijax emitted it: its `depth` innermost alijax
    frames ("file:function:line < caller"), else its op_name."""
    chain = _frame_chains(hlo)
    where = {}
    for match in _INSTRUCTION.finditer(hlo):
        name, metadata = match.groups()
        frame = re.search(r"stack_frame_id=(\d+)", metadata)
        frames = chain(int(frame.group(1)))[:depth] if frame else []
        if frames:
            where[name] = " < ".join(frames)
            continue
        op = re.search(r'op_name="([^"]*)"', metadata)
        if op:
            where[name] = op.group(1)
    return where


def op_seconds(run, trace_dir: str) -> collections.Counter:
    """Runs run() once under the profiler; returns the seconds of each op (trace event name)."""
    with jax.profiler.trace(trace_dir):
        run()
    trace = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    events = json.load(gzip.open(max(trace, key=os.path.getmtime)))["traceEvents"]
    seconds = collections.Counter()
    for event in events:
        name = event.get("name", "")
        # Complete events only; the control-flow thunks contain the ops already counted.
        if event.get("ph") == "X" and not name.startswith(("$", "Thunk", "while", "conditional")):
            seconds[name] += event.get("dur", 0) / 1e6
    return seconds


def summed_by(seconds: collections.Counter, where: dict[str, str]):
    """(seconds summed by where[op], seconds of the ops where does not name, by op)."""
    known, unknown = collections.Counter(), collections.Counter()
    for name, secs in seconds.items():
        if name in where:
            known[where[name]] += secs
        else:
            unknown[name] += secs
    return known, unknown


def _ann_benchmark():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ann.py")
    spec = importlib.util.spec_from_file_location("ann_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _codes(args) -> np.ndarray:
    if args.codes:
        return np.load(args.codes)
    x = _ann_benchmark().synthetic(args.n, 1)[0]
    binarizer = codes_lib.fit_itq(x, 256, rng=jax.random.key(0))  # as an index's seed 0
    return np.asarray(codes_lib.encode(binarizer, x))


def coverage_warning(op_seconds: float, wall_seconds: float) -> str | None:
    """A warning when the trace's ops add up to less than half the stage's unprofiled wall time.

    Ops on several threads can sum to more than the wall time, never to much less, unless the
    trace lost events: at 1M `--stage initial` (2026-12-07) held 3.0 s of ops against 6.2 s of
    wall time and no op of stage 2, in exactly 1,000,000 complete events (the trace keeps the
    first million; the partition's loops of many small steps fill it), while at 200k all of
    it was there in 514k events. Profile that stage on fewer codes."""
    if op_seconds >= 0.5 * wall_seconds:
        return None
    return (
        f"warning: the trace holds {op_seconds:.2f} s of ops against {wall_seconds:.2f} s "
        "unprofiled; it probably lost events (the later steps): profile fewer codes"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--stage", choices=graph.STAGES, default="initial")
    parser.add_argument("--degree", type=int, default=32)
    parser.add_argument("--codes", default=None, help="packed uint32 codes [n, W] (.npy)")
    parser.add_argument("--depth", type=int, default=2, help="alijax frames per line")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--trace-dir", default=None)
    args = parser.parse_args(argv)

    codes = _codes(args)
    config = graph.GraphConfig()
    mesh = graph._mesh_or_default(None, config)
    plan = graph._plan_for(codes.shape, args.degree, mesh, config)
    stages = graph.STAGES[: graph.STAGES.index(args.stage) + 1]
    programs = [graph._executable(plan, mesh, config.axis, stage) for stage in stages]
    hlo = programs[-1].as_text()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(config.axis))
    device_codes = jax.device_put(codes, sharding)

    def before_last():
        out = None
        for program in programs[:-1]:
            out = program(device_codes) if out is None else program(device_codes, out)
        return jax.block_until_ready(out)

    def last(lists):
        args_ = (device_codes,) if lists is None else (device_codes, lists)
        return jax.block_until_ready(programs[-1](*args_))

    # The stages donate their lists, so every run of the last one gets fresh ones.
    last(before_last())  # warm-up: the first run pages in code and allocates
    lists = before_last()
    start = time.perf_counter()
    last(lists)
    seconds = time.perf_counter() - start
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="alijax-profile-")
    lists = before_last()
    seconds_by_op = op_seconds(lambda: last(lists), trace_dir)

    print(
        f"stage {args.stage}, n={codes.shape[0]}, {codes.shape[1] * 32}-bit codes, "
        f"{seconds:.2f} s unprofiled; trace in {trace_dir}"
    )
    warning = coverage_warning(sum(seconds_by_op.values()), seconds)
    if warning:
        print(warning)
    for title, where in (("step", steps(hlo)), ("source line", source_lines(hlo, args.depth))):
        known, unknown = summed_by(seconds_by_op, where)
        print(
            f"\nby {title}: {sum(known.values()):.2f} s of ops, "
            f"{sum(unknown.values()):.2f} s unattributed"
        )
        for key, secs in known.most_common(args.top):
            print(f"{secs:8.2f} s  {key}")
        print("unattributed:", ", ".join(f"{k} {v:.2f} s" for k, v in unknown.most_common(6)))


if __name__ == "__main__":
    main()
