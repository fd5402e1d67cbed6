"""Reproducibility studies: one config, several methods x seeds, one table.

`python -m alijax study int8 --config configs/int8_digits.py` trains every recipe of
config.study.methods with every seed of config.study.seeds (each in workdir/<method>/seed<s>, so
an interrupted study resumes where it stopped), then writes to config.study.results_dir:

  <name>.json   {"methods": {method: {"test_acc_mean", "test_acc_std", "test_accs", ...}},
                 "layers": {layer: {method: {metric: mean over logged steps}}}, "command", ...}
  <name>.md     mean +- std per method, and the per-layer gradient-quantization table
  <name>_accuracy.png, <name>_grad_error.png

Accuracies are fractions in [0, 1]; std is the sample standard deviation over seeds (ddof=1).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Mapping

import numpy as np

from alijax import train
from alijax.data.files import atomic_write

# Per-layer telemetry the INT8 ops log (alijax.quant._op.TELEMETRY_KEYS) that the study reports.
LAYER_METRICS = (
    "mcs_objective",
    "mcs_objective_maxabs",
    "grad_rel_l2",
    "grad_cos",
    "clip_fraction",
)


def run_config(base, method: str, seed: int):
    """The training config of one (method, seed) cell of the study."""
    config = copy.deepcopy(base)
    config.model.recipe = method
    config.seed = seed
    del config["study"]
    return config


def run_cell(base, method: str, seed: int, workdir: str, progress: bool) -> dict:
    """Trains (or resumes) one cell; returns its summary, eval curve and layer telemetry."""
    cell_dir = os.path.join(workdir, method, f"seed{seed}")
    start = time.perf_counter()
    _, summary = train.train(run_config(base, method, seed), cell_dir, progress=progress)
    records = train.read_metrics(os.path.join(cell_dir, "metrics.jsonl"))
    return {
        "summary": summary,
        "wall_s": time.perf_counter() - start,
        "curve": [(r["step"], r["test_accuracy"]) for r in records if "test_accuracy" in r],
        "layers": layer_telemetry(records),
    }


def layer_telemetry(records: list[Mapping]) -> dict[str, dict[str, float]]:
    """{layer: {metric: mean over the logged training records}} from "quant/<layer>/<metric>"."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for key, value in record.items():
            if not key.startswith("quant/"):
                continue
            layer, metric = key[len("quant/") :].rsplit("/", 1)
            if metric in LAYER_METRICS:
                sums[layer][metric].append(value)
    return {
        layer: {metric: float(np.mean(values)) for metric, values in metrics.items()}
        for layer, metrics in sums.items()
    }


def summarize(cells: Mapping[str, list[dict]]) -> dict:
    """Per method: accuracy mean/std over seeds, per-seed values and wall time."""
    methods = {}
    for method, runs in cells.items():
        accs = np.array([run["summary"]["test_accuracy"] for run in runs])
        methods[method] = {
            "test_acc_mean": float(accs.mean()),
            "test_acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "test_accs": accs.tolist(),
            "test_loss_mean": float(np.mean([run["summary"]["test_loss"] for run in runs])),
            "wall_s": float(sum(run["wall_s"] for run in runs)),
        }
    return methods


def layer_table(cells: Mapping[str, list[dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """{layer: {method: {metric: mean over seeds}}} for the methods that log telemetry."""
    table: dict = defaultdict(dict)
    for method, runs in cells.items():
        layers = {layer for run in runs for layer in run["layers"]}
        for layer in sorted(layers):
            metrics = defaultdict(list)
            for run in runs:
                for metric, value in run["layers"].get(layer, {}).items():
                    metrics[metric].append(value)
            table[layer][method] = {m: float(np.mean(v)) for m, v in metrics.items()}
    return dict(table)


def mcs_check(layers: Mapping, ours: str = "da_int8", baseline: str = "per_tensor_int8") -> dict:
    """On how many quantized layers `ours` has the lower MCS objective: against the baseline's
    own run, and against one max-abs scale evaluated on ours' own gradients."""
    rows = [m for m in layers.values() if ours in m and "mcs_objective" in m[ours]]
    below_run = [
        m[ours]["mcs_objective"] < m[baseline]["mcs_objective"]
        for m in rows
        if baseline in m and "mcs_objective" in m[baseline]
    ]
    below_same = [
        m[ours]["mcs_objective"] < m[ours]["mcs_objective_maxabs"]
        for m in rows
        if "mcs_objective_maxabs" in m[ours]
    ]
    return {
        "layers": len(rows),
        f"below_{baseline}_run": int(sum(below_run)),
        "below_maxabs_on_same_gradients": int(sum(below_same)),
    }


def markdown(
    name: str, methods: Mapping, layers: Mapping, command: str, env: Mapping | None = None
) -> str:
    env = env or {}
    lines = [
        f"# {name}",
        "",
        f"Command: `{command}`",
        "",
        f"Environment: Python {env.get('python', '?')}, jax {env.get('jax', '?')} on "
        f"{env.get('device', '?')} ({env.get('platform', '?')}), packages pinned by "
        f"`{env.get('lock_file', 'requirements-lock.txt')}`.",
        "",
        "| method | test accuracy (mean ± std over seeds) | seeds | wall time (s) |",
        "|---|---|---|---|",
    ]
    for method, row in methods.items():
        accs = ", ".join(f"{a:.4f}" for a in row["test_accs"])
        lines.append(
            f"| {method} | {row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f} | {accs} | "
            f"{row['wall_s']:.0f} |"
        )
    if layers:
        lines += [
            "",
            "Weight-gradient quantization per layer, mean over logged steps and seeds. MCS "
            "objective: the magnitude-weighted error of Eq. (3) for the scales each method used; "
            "`maxabs on same G` evaluates one max-abs scale per tensor on the same gradients.",
            "",
            "| layer | method | MCS objective | maxabs on same G | rel. L2 | cosine | clipped |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer, per_method in layers.items():
            for method, m in per_method.items():
                lines.append(
                    f"| {layer} | {method} | {m.get('mcs_objective', float('nan')):.4g} | "
                    f"{m.get('mcs_objective_maxabs', float('nan')):.4g} | "
                    f"{m.get('grad_rel_l2', float('nan')):.4f} | "
                    f"{m.get('grad_cos', float('nan')):.5f} | "
                    f"{m.get('clip_fraction', float('nan')):.4f} |"
                )
    return "\n".join(lines) + "\n"


def plot(name: str, cells: Mapping, layers: Mapping, results_dir: str) -> list[str]:
    """Accuracy curves (mean over seeds) and per-layer relative gradient error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in cells.items():
        steps = [s for s, _ in runs[0]["curve"]]
        accs = np.mean([[a for _, a in run["curve"]] for run in runs], axis=0)
        ax.plot(steps, accs, marker="o", label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, os.path.join(results_dir, f"{name}_accuracy.png")))
    plt.close(fig)

    if layers:
        names = list(layers)
        methods = sorted({m for per_method in layers.values() for m in per_method})
        fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(names)), 4))
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            values = [layers[n].get(method, {}).get("grad_rel_l2", np.nan) for n in names]
            ax.bar(np.arange(len(names)) + i * width, values, width, label=method)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
        ax.set_xticklabels(names, rotation=75, fontsize=6)
        ax.set_ylabel("relative L2 error of G_W")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(results_dir, f"{name}_grad_error.png")))
        plt.close(fig)
    return paths


def environment() -> dict:
    import jax

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "lock_file": "requirements-lock.txt",
    }


def _save(fig, path: str) -> str:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    return path


def run_study(config, workdir: str, command: str = "", progress: bool = False) -> dict:
    """Runs every (method, seed) of config.study and writes the results; returns the JSON dict."""
    study = config.study
    cells: dict[str, list[dict]] = {}
    for method in study.methods:
        cells[method] = []
        for seed in study.seeds:
            print(f"[study] {method} seed {seed}", flush=True)
            cells[method].append(run_cell(config, method, seed, workdir, progress))
            print(
                f"[study]   test accuracy {cells[method][-1]['summary']['test_accuracy']:.4f}",
                flush=True,
            )
    methods = summarize(cells)
    layers = layer_table({m: cells[m] for m in study.layer_methods if m in cells})
    os.makedirs(study.results_dir, exist_ok=True)
    result = {
        "name": study.name,
        "command": command,
        "methods": methods,
        "layers": layers,
        "mcs_check": mcs_check(layers),
        "curves": {m: [run["curve"] for run in runs] for m, runs in cells.items()},
        "environment": environment(),
    }
    with atomic_write(os.path.join(study.results_dir, f"{study.name}.json"), text=True) as f:
        json.dump(result, f, indent=1)
    with atomic_write(os.path.join(study.results_dir, f"{study.name}.md"), text=True) as f:
        f.write(markdown(study.name, methods, layers, command, result["environment"]))
    plot(study.name, cells, layers, study.results_dir)
    return result
