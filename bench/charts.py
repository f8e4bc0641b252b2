"""
The benchmark's results as charts (PNG, matplotlib), so that a reader sees at
a glance where the MSA wins and loses:

  throughput.png        accepted (or drained) msgs/s per scenario and server
  cpu-per-message.png   server CPU per message per scenario and server
  memory.png            memory per idle authenticated session, and the peak
                        memory with one 50 MB message

Each bar group is labelled with the MSA's ratio to aiosmtpd and to Postfix,
green where the MSA does better than that peer, red where it does worse.

Input: the JSON that ``bench/run.py --json FILE`` writes (every run's
numbers: ``{"results": {scenario: {server: [run, ...]}}}``; the charts show
the medians; ``bench/results-2026-12-08.json`` is one), or a file of
medians only (``{server: {metric: value}}`` instead of the run lists),
transcribed from RESULTS.md by ``--from-markdown``::

  python bench/charts.py bench/results-2026-12-08.json -o bench/charts
  python bench/charts.py --from-markdown bench/RESULTS.md \\
      --run "Run of 2026-12-07: every scenario" > results.json

matplotlib is a benchmark dependency only (``pip install matplotlib``; the
test extra has it for ``tests/test_benchcharts.py``), not the MSA's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Any

KB = 1024
MB = 1024 * 1024

#: The scenarios of the throughput and CPU charts, in order, with the
#: metric that is their throughput.
LOAD_SCENARIOS = [
    ("relay", "rate", "relay (MAIN)"),
    ("outbox", "rate", "outbox"),
    ("a", "rate", "(a) 1 msg/conn"),
    ("a1", "rate", "(a1) one client"),
    ("b", "rate", "(b) 20 msgs/conn"),
    ("size-1k", "rate", "1 KB"),
    ("size-10k", "rate", "10 KB"),
    ("size-100k", "rate", "100 KB"),
    ("size-1m", "rate", "1 MB"),
    ("drain", "drain_rate", "drain a backlog"),
    ("nocache", "rate", "scrypt per login"),
]
SERVERS = ["MSA", "MSA workers=2", "MSA workers=2+Redis", "aiosmtpd", "Postfix"]
COLOURS = {
    "MSA": "#1f5fa8",
    "MSA workers=2": "#6fa8dc",
    "MSA workers=2+Redis": "#a9c9ea",
    "aiosmtpd": "#9a9a9a",
    "Postfix": "#d08a2c",
}
#: The MSA's columns, each labelled with its ratios to the peers.
MSAS = ("MSA", "MSA workers=2", "MSA workers=2+Redis")


def _groupHeight(least: float) -> float:
    """
    Inches per group of bars: room for its ratio lines (two per MSA
    column) at 8 points each.
    """
    return max(least, 0.17 * 2 * len(MSAS))


#: RESULTS.md's row labels, and the run.py metric and factor (to run.py's
#: units: seconds, bytes) of each.
MARKDOWN_ROWS = {
    "accepted msgs/s (first connect to last 250)": ("rate", 1),
    "drain msgs/s (release to the sink having all)": ("drain_rate", 1),
    "server CPU per message (until the sink has all) (ms)": ("cpu_per_msg", 1e-3),
    "server CPU per message drained (ms)": ("cpu_per_msg", 1e-3),
    "memory per held connection (KB)": ("per_conn", KB),
    "server peak memory (MB)": ("peak", MB),
}


def medians(data: dict) -> dict[str, dict[str, dict[str, float]]]:
    """
    C{{scenario: {server: {metric: median}}}} from either input form.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, servers in data["results"].items():
        for server, runs in servers.items():
            if isinstance(runs, dict):
                values = {k: float(v) for k, v in runs.items() if v is not None}
            else:
                keys = {k for run in runs for k in run if k != "errors"}
                values = {}
                for key in keys:
                    numbers = [
                        r[key] for r in runs if isinstance(r.get(key), (int, float))
                    ]
                    if numbers:
                        values[key] = float(statistics.median(numbers))
            out.setdefault(scenario, {})[server] = values
    return out


def fromMarkdown(text: str, run: str) -> dict:
    """
    The medians of one run's tables in RESULTS.md (the section headed
    C{## <run>}), for the metrics the charts show, in run.py's units.
    """
    section = text.split(f"## {run}\n", 1)[1].split("\n## ", 1)[0]
    results: dict[str, dict[str, dict[str, float]]] = {}
    scenario = None
    servers: list[str] = []
    for line in section.splitlines():
        heading = re.match(r"#### ([\w-]+): ", line)
        if heading:
            scenario = heading.group(1)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "metric":
            servers = cells[1:]
            continue
        if scenario is None or cells[0] not in MARKDOWN_ROWS:
            continue
        metric, factor = MARKDOWN_ROWS[cells[0]]
        for server, cell in zip(servers, cells[1:], strict=True):
            if cell != "-":
                value = float(f"{float(cell.split()[0]) * factor:.12g}")
                results.setdefault(scenario, {}).setdefault(server, {})[metric] = value
    date = re.search(r"(\d{4}-\d{2}-\d{2})", run)
    return {
        "date": date.group(1) if date else run,
        "source": f"medians transcribed from bench/RESULTS.md, '{run}'",
        "results": results,
    }


def _ratios(values: dict[str, float], higherIsBetter: bool):
    """
    For each MSA column and each peer present: (text, whether that MSA
    does better than the peer).
    """
    for name in MSAS:
        msa = values.get(name)
        for peer in ("aiosmtpd", "Postfix"):
            if msa and values.get(peer):
                ratio = msa / values[peer]
                better = ratio >= 1 if higherIsBetter else ratio <= 1
                yield f"{name} = {ratio:.2f} x {peer}", better


def _groupedBars(
    ax: Any,
    groups: list[tuple[str, dict[str, float]]],
    unit: str,
    higherIsBetter: bool,
) -> None:
    """
    Horizontal bars, one group per scenario, one bar per server, each group
    labelled with the MSA's ratios (green: better than every peer).
    """
    # The servers of this run (a run without the Redis column has none).
    servers = [s for s in SERVERS if any(s in values for _, values in groups)]
    height = 0.8 / max(1, len(servers))
    for index, server in enumerate(servers):
        ys = [g - 0.4 + height * (index + 0.5) for g in range(len(groups))]
        xs = [values.get(server, 0.0) for _, values in groups]
        ax.barh(ys, xs, height=height, color=COLOURS[server], label=server)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([label for label, _ in groups])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(
        unit + (" (higher is better)" if higherIsBetter else " (lower is better)")
    )
    top = max((max(v.values(), default=1.0) for _, v in groups), default=1.0)
    ax.set_xlim(right=top * 12)
    for position, (_, values) in enumerate(groups):
        lines = list(_ratios(values, higherIsBetter))
        for offset, (text, better) in enumerate(lines):
            ax.text(
                max(values.values(), default=1.0) * 1.15,
                position + (offset - (len(lines) - 1) / 2) * 0.8 / max(2, len(lines)),
                text,
                va="center",
                fontsize=8,
                color="#1a7f37" if better else "#c62828",
            )
    ax.legend(
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=max(1, len(servers)),
        fontsize=8,
        frameon=False,
    )
    ax.grid(axis="x", which="both", alpha=0.3)


def render(data: dict, directory: str) -> list[str]:
    """
    Draw the three charts into C{directory}.

    @return: the paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    os.makedirs(directory, exist_ok=True)
    found = medians(data)
    when = data.get("date", "")
    label = f"run of {when}" if when else "bench/run.py"
    written = []

    def save(figure, name: str) -> None:
        path = os.path.join(directory, name)
        figure.tight_layout()
        figure.savefig(path, dpi=100, metadata={"Software": None})
        pyplot.close(figure)
        written.append(path)

    throughput = [
        (title, {s: v[metric] for s, v in found[key].items() if metric in v})
        for key, metric, title in LOAD_SCENARIOS
        if key in found
    ]
    figure, ax = pyplot.subplots(
        figsize=(10, _groupHeight(0.55) * len(throughput) + 1.5)
    )
    _groupedBars(ax, throughput, "messages per second", higherIsBetter=True)
    ax.set_title(f"Throughput per scenario and server ({label})", pad=22)
    save(figure, "throughput.png")

    cpu = [
        (
            title,
            {
                s: v["cpu_per_msg"] * 1000
                for s, v in found[key].items()
                if "cpu_per_msg" in v
            },
        )
        for key, _, title in LOAD_SCENARIOS + [("big", "", "one 50 MB message")]
        if key in found
    ]
    figure, ax = pyplot.subplots(figsize=(10, _groupHeight(0.55) * len(cpu) + 1.5))
    _groupedBars(ax, cpu, "server CPU per message, ms", higherIsBetter=False)
    ax.set_title(f"CPU per message ({label})", pad=22)
    save(figure, "cpu-per-message.png")

    memory = []
    if "idle" in found:
        memory.append(
            (
                "per idle session (KB)",
                {
                    s: v["per_conn"] / KB
                    for s, v in found["idle"].items()
                    if "per_conn" in v
                },
            )
        )
    if "big" in found:
        memory.append(
            (
                "peak, one 50 MB message (MB)",
                {s: v["peak"] / MB for s, v in found["big"].items() if "peak" in v},
            )
        )
    figure, ax = pyplot.subplots(
        figsize=(10, _groupHeight(0.9) * max(len(memory), 1) + 1.5)
    )
    _groupedBars(ax, memory, "KB per idle session; MB peak", higherIsBetter=False)
    ax.set_title(f"Memory ({label})", pad=22)
    save(figure, "memory.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", help="JSON of bench/run.py --json")
    parser.add_argument("-o", "--out", default="bench/charts", help="directory")
    parser.add_argument("--from-markdown", metavar="RESULTS_MD")
    parser.add_argument("--run", help="the run's heading in RESULTS.md")
    args = parser.parse_args(argv)
    if args.from_markdown:
        with open(args.from_markdown, encoding="utf-8") as f:
            data = fromMarkdown(f.read(), args.run)
        json.dump(data, sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    if not args.results:
        parser.error("give the results JSON (or --from-markdown)")
    with open(args.results, encoding="utf-8") as f:
        data = json.load(f)
    for path in render(data, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
