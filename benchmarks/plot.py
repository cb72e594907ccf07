"""Plot a benchmark results JSON (written by ``bench_*.py``) as a grid of log-log line charts.

    python benchmarks/plot.py benchmarks/results/bench_op.json [-o out.png]

The JSON says how to plot itself in its ``"plot"`` entry: which record field is the x axis, which
is the time, which field names the line (series), and which fields split the records into
subplot rows and columns. Each line is the median; the shaded band spans min..max over the reps.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Dict, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE_CYCLE = ("o-", "s-", "^-", "D-", "v-", "x--", "*-", "P-")


def _panel_title(keys, values) -> str:
    return ", ".join(f"{key}={value}" for key, value in zip(keys, values))


def plot_results(payload: Dict[str, object], png_path: Path) -> Path:
    """Draw ``payload["results"]`` as ``payload["plot"]`` describes and save it to ``png_path``."""
    spec = payload["plot"]
    x_key, y_key = spec["x"], spec.get("y", "median_s")
    low_key, high_key = spec.get("low", "min_s"), spec.get("high", "max_s")
    series_key = spec["series"]
    row_keys, col_keys = list(spec.get("rows", [])), list(spec.get("cols", []))
    records = list(payload["results"])
    order = spec.get("series_order")
    if order:  # only the named series, in that order (e.g. the floor's best reader, not every candidate)
        records = [record for record in records if record[series_key] in order]
    if not records:
        raise ValueError("plot: no results to plot")

    def levels(keys):
        seen = []
        for record in records:
            value = tuple(record[key] for key in keys)
            if value not in seen:
                seen.append(value)
        return seen

    rows, cols = levels(row_keys), levels(col_keys)
    present = [value[0] for value in levels([series_key])]
    series = [name for name in order if name in present] if order else present
    unit, scale = spec.get("time_unit", ("ms", 1e3))

    fig, axes = plt.subplots(len(rows), len(cols), figsize=(max(8.0, 4.2 * len(cols)), 3.4 * len(rows) + 0.8),
                             squeeze=False, sharex=True)
    for (i, row), (j, col) in itertools.product(enumerate(rows), enumerate(cols)):
        ax = axes[i][j]
        in_panel = [record for record in records
                    if tuple(record[key] for key in row_keys) == row and tuple(record[key] for key in col_keys) == col]
        for style, name in zip(itertools.cycle(STYLE_CYCLE), series):
            line = sorted((record for record in in_panel if record[series_key] == name), key=lambda r: r[x_key])
            if not line:
                continue
            xs = [record[x_key] for record in line]
            ax.plot(xs, [record[y_key] * scale for record in line], style, label=name, markersize=4)
            if low_key in line[0] and high_key in line[0]:
                ax.fill_between(xs, [record[low_key] * scale for record in line],
                                [record[high_key] * scale for record in line], alpha=0.2)
        ax.set_xscale("log", base=spec.get("x_log_base", 2))
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(_panel_title(row_keys + col_keys, row + col), fontsize=9)
        if i == len(rows) - 1:
            ax.set_xlabel(spec.get("xlabel", x_key))
        if j == 0:
            ax.set_ylabel(f"{spec.get('ylabel', 'time')} [{unit}]")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    height = fig.get_figheight()
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), frameon=False)
    env = payload.get("environment", {})
    footer = (f"{spec.get('title', payload.get('benchmark', ''))}\n{env.get('cpu_model', '?')}, "
              f"{env.get('torch_num_threads', '?')} threads | torch {env.get('torch', '?')} | "
              f"{env.get('timestamp_utc', '')} | commit {str(env.get('git_commit'))[:10]}")
    fig.text(0.5, 0.01, footer, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.55 / height, 1, 1 - 0.45 / height))
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_file(json_path: Path, png_path: Optional[Path] = None) -> Path:
    """Read a results JSON and write its PNG (default: next to it, same name, ``.png``)."""
    json_path = Path(json_path)
    with open(json_path) as f:
        payload = json.load(f)
    return plot_results(payload, png_path or json_path.with_suffix(".png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="results JSON written by a bench_*.py script")
    parser.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: JSON's, .png)")
    args = parser.parse_args(argv)
    print(plot_file(args.json, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
