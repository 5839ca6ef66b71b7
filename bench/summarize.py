"""Turn benchmark JSON into SUMMARY.md and a bar chart of fastae's speedups.

    python bench/summarize.py results.json [more.json ...] --out summary

Reads the JSON of ``pytest bench --benchmark-json`` (or of ``python -m fastae bench --json``),
prints the ratio table, and writes ``SUMMARY.md`` (per card: median time per provider and
fastae's speedup per case, with dtype and float32 matmul precision, then the
device-independent figures) and ``speedup.png`` (matplotlib; skipped when it is missing).
Ratios are meant within one run: in the tables a ratio whose two times come from different
files is marked ``*``; a missing or malformed file is an error naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from fastae import benchmark as fb


class BadInput(ValueError):
    """A JSON file that holds no benchmark run."""


def read_run(path: str) -> dict:
    """The JSON object in ``path``, checked to be a benchmark run (BadInput naming the file)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"{path}: {error}") from None
    entries = data.get("benchmarks") if isinstance(data, dict) else None
    if not (isinstance(entries, list) and all(isinstance(entry, dict) for entry in entries)):
        raise BadInput(f"{path}: not the JSON of a benchmark run (an object with 'benchmarks')")
    return data


def load(paths: list[str]) -> list[dict]:
    """The records of every file, each with its ``source`` (the file's path): ratios between
    records of different files are marked as such (fb.ratio_table)."""
    records = []
    for path in paths:
        found = fb.records_from_json(read_run(path))
        if not found:
            raise BadInput(f"{path}: no fastae benchmark record (an entry with extra_info 'case')")
        for record in found:
            if "provider" not in record:
                raise BadInput(f"{path}: a record of case {record['case']!r} has no provider")
            record["source"] = str(path)
        records += found
    return records


def labels(paths: list[str]) -> list[str]:
    """Each file's name, or its path where two files share a name (two runs' bench.json)."""
    names = [Path(path).name for path in paths]
    return [
        name if names.count(name) == 1 else str(path)
        for name, path in zip(names, paths, strict=True)
    ]


def run_lines(paths: list[str]) -> list[str]:
    """A line per JSON: the commit it was measured at (pytest-benchmark's commit_info) and,
    where its machine_info holds them, the run's conditions (fb.run_conditions)."""
    lines = []
    for path, label in zip(paths, labels(paths), strict=True):
        data = read_run(path)
        info = data.get("machine_info") or {}
        commit = (data.get("commit_info") or {}).get("id")
        parts = [f"commit {commit[:7]}"] if commit else []
        if "torch_threads" in info:
            parts.append(f"{info['torch_threads']} torch threads")
        if info.get("load_average"):
            loads = " / ".join(map(str, info["load_average"]))
            parts.append(f"load average {loads} (1, 5, 15 minutes, at the end)")
        before, after = info.get("launch_us_before_profiling"), info.get("launch_us_at_end")
        if before is not None and after is not None:
            parts.append(
                f"a kernel launch {before:.1f} us before the first profile, {after:.1f} us at the"
                " end"
            )
        if parts:
            lines.append(f"{label}: {', '.join(parts)}")
    return lines


def by_card(records: list[dict]) -> dict[str, list[dict]]:
    cards: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        cards[record.get("device_name", "unknown")].append(record)
    return dict(cards)


def _fastae_pairs(records: list[dict], field: str) -> str:
    """The fastae provider's ``field`` (a dict: its ops' backends, its environment's fusion and
    launch settings) over ``records``, as sorted name=value pairs."""
    seen = sorted(
        {
            f"{name}={value}"
            for record in records
            if record.get("provider") == "fastae"
            for name, value in (record.get(field) or {}).items()
        }
    )
    return ", ".join(seen) or "-"


def summary_markdown(records: list[dict], sources: list[str]) -> str:
    lines = ["# fastae benchmark summary", ""]
    lines.append(f"From {', '.join(labels(sources))}.")
    runs = run_lines(sources)
    if runs:
        lines += ["", "Runs:", ""] + [f"- {line}" for line in runs]
    lines += [
        "",
        "Median time of one call: an op's forward plus backward into its trainable inputs "
        "(corrupt: forward only), or a training step (zero grads, forward, loss, backward). "
        "`vs eager` / `vs compile` = that provider's time over fastae's (above 1: fastae is "
        "faster). `tf32` is fp32 with `torch.set_float32_matmul_precision('high')`; compile "
        "time is excluded.",
        "",
        "Figures of one call: `ops` = ops the dispatcher ran (a TorchDispatchMode, under which "
        "fastae's models compose their ops instead of running a step as one autograd node; a "
        "fastae op counts once, not the kernels or reference math inside it; under "
        "torch.compile only what the compiled code dispatches, fused kernels not counted; the "
        "CUDA-graph replays none: `-`), `saved MiB` = bytes saved for backward beyond the inputs"
        " and parameters (saved_tensors_hooks, each storage once), on CUDA `peak MiB` = peak "
        "allocated memory during the call beyond what was allocated before it (the step's own, "
        "whatever else the process holds) and `kernels` = kernels launched (torch.profiler), "
        "and for fastae's providers `vs ref` = the largest relative difference of one call's "
        "outputs and gradients from the reference backend's in float64 on the same values and "
        "draws (`!`: beyond rounding at the dtype: more than twice the reference's own "
        "difference there and more than a floor; records made before compared at the dtype).",
    ]
    for card, card_records in by_card(records).items():
        torch_versions = sorted({str(r.get("torch")) for r in card_records})
        lines += ["", f"## {card}", ""]
        lines.append(
            f"torch {', '.join(torch_versions)}; fastae backends: "
            f"{_fastae_pairs(card_records, 'fastae_backends')}; fastae's settings: "
            f"{_fastae_pairs(card_records, 'env')}"
        )
        lines += ["", "### Time and speedup", "", fb.ratio_table(card_records, markdown=True)]
        lines += ["", "### Device-independent figures", ""]
        lines.append(fb.figures_table(card_records, markdown=True))
        lines += ["", fb.agreement_line(card_records) + "."]
        profiled = fb.kernel_time_table(card_records, markdown=True)
        if profiled.count("\n") > 1:
            lines += ["", "### Where the GPU time goes", ""]
            lines.append(
                f"torch.profiler over {fb.PROFILED_CALLS} calls, per call: `GPU ms` = the sum "
                "of kernel durations, `busy` = that over the median wall time (well below "
                "100%: the call waits on the CPU to launch), and the longest kernels."
            )
            lines += ["", profiled]
    return "\n".join(lines) + "\n"


def bar_chart(records: list[dict], path: Path) -> bool:
    """Bars of fastae's speedup over each other provider (log scale), a panel per card and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return False
    panels: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in fb.group_rows(records):
        first = row["first"]
        panels[(first.get("device_name", "unknown"), first.get("dtype", ""))].append(row)
    if not panels:
        return False
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(10, 0.8 * max(map(len, panels.values()))), 3.6 * len(panels)),
        squeeze=False,
        layout="constrained",
    )
    for ax, ((card, dtype), rows) in zip(axes[:, 0], panels.items(), strict=True):
        labels = [f"{r['first']['case']} {r['first'].get('size', '')}" for r in rows]
        xs = range(len(rows))
        others = [
            p for p in ("eager", "compile", fb.JACREV) if any(p in r["providers"] for r in rows)
        ]
        if not others:  # nothing to compare fastae with in this panel
            continue
        width = 0.8 / len(others)
        for i, other in enumerate(others):
            values = [fb.speedup(r, other) or math.nan for r in rows]
            offset = (i - (len(others) - 1) / 2) * width
            ax.bar([x + offset for x in xs], values, width=width, label=f"vs {other}")
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"fastae speedup — {card}, {dtype}", fontsize=10)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="benchmark JSON file(s)")
    parser.add_argument("--out", default=".", help="folder for SUMMARY.md and speedup.png")
    args = parser.parse_args(argv)
    missing = [p for p in args.json if not Path(p).is_file()]
    if missing:
        parser.error(f"json: no such file: {', '.join(missing)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    try:
        records = load(args.json)
    except BadInput as error:
        parser.error(f"json: {error}")
    paths = args.json
    if not records:
        print("no fastae benchmark records found", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "SUMMARY.md").write_text(summary_markdown(records, paths))
    charted = bar_chart(records, out / "speedup.png")
    print(f"wrote {out / 'SUMMARY.md'}" + (f" and {out / 'speedup.png'}" if charted else ""))
    for card, card_records in by_card(records).items():
        print(f"\n{card}\n")
        print(fb.figures_table(card_records))
        print()
        print(fb.ratio_table(card_records))
        print()
        print(fb.agreement_line(card_records))
    for card, card_records in by_card(records).items():  # last, short: a log's tail keeps it
        print(f"\n{card}: fastae against eager and compile\n")
        print(fb.ratio_table(card_records, compact=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
