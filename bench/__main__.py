"""``python -m bench``: run the benchmarks pinned to CPU 0 and print one table: each workload,
thinpool's figure, the baseline's figure from the same run, the ratio, the target and whether it
was met.

    python -m bench                         # everything (about 3.5 minutes on 2 CPUs)
    python -m bench -k "io and not qemu"    # a subset: pytest's -k on the test names
    python -m bench --json > run.json       # the table as JSON (pytest's output goes to stderr)
    python -m bench --png ratios.png        # and a chart of the ratios (needs matplotlib)
    python -m bench --markdown              # the table as Markdown, for bench/README.md
    python -m bench --save raw.json         # keep pytest-benchmark's own JSON
    python -m bench --from-json raw.json    # rebuild the table from it; runs nothing
    python -m bench --basetemp /dev/shm/tp  # pytest's temporary directory (default: /tmp, on disk)

Any other option goes to pytest (``python -m bench -x``).

A benchmark joins a row with ``bench._util.tag``; the figures are computed from each side's
median round time (see that module for the units). The ratio is always "how many times better
thinpool is": baseline / thinpool for times and memory, thinpool / baseline for throughput.
Targets are checked here and reported, never asserted: a missed target does not fail the run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
HIGHER_IS_BETTER = {"MiB/s", "ops/s"}
#: Units whose figure is not a time but the ``value`` a benchmark recorded (lower is better):
#: peak memory (``MiB``), bytes a change used on disk (``KiB``).
VALUE_UNITS = {"MiB", "KiB"}


# -- running -----------------------------------------------------------------------------------
def pin_to_cpu0() -> bool:
    """Pin this process (and so every child: pytest, qemu-io, the thin tools) to CPU 0."""
    if hasattr(os, "sched_setaffinity") and 0 in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {0})
        return True
    return False


def run_pytest(raw_json: pathlib.Path, expr: str | None, basetemp: str | None,
               extra: list[str], quiet_stdout: bool) -> int:
    argv = [sys.executable, "-m", "pytest", str(HERE), "--benchmark-only",
            f"--benchmark-json={raw_json}", "-o", "tmp_path_retention_policy=failed"]
    if expr:
        argv += ["-k", expr]
    if basetemp:
        argv += [f"--basetemp={basetemp}"]
    argv += extra
    return subprocess.call(argv, cwd=HERE.parent,
                           stdout=sys.stderr if quiet_stdout else None)


# -- the table ---------------------------------------------------------------------------------
def figure(side: dict, stats: dict) -> float:
    unit = side["unit"]
    median = stats["median"]
    if unit in VALUE_UNITS:
        return float(side["value"])
    if unit == "MiB/s":
        return side["amount"] / median
    if unit == "ops/s":
        return side["amount"] / median
    if unit == "us/op":
        return median / side["amount"] * 1e6
    if unit == "ms":
        return median * 1e3
    if unit == "s":
        return median
    raise ValueError(f"unknown unit {unit!r}")


def build_rows(raw: dict) -> list[dict]:
    """Pair the sides of every workload found in pytest-benchmark's JSON."""
    rows: dict[str, dict] = {}
    for b in raw.get("benchmarks", []):
        for tagged in b.get("extra_info", {}).get("rows", []):
            row = rows.setdefault(tagged["workload"], {"workload": tagged["workload"]})
            stats = b["stats"]
            if tagged.get("times"):       # a side timed in alternation with the other one
                t = tagged["times"]
                stats = {"median": statistics.median(t), "min": min(t), "mean": statistics.mean(t),
                         "rounds": len(t)}
            row[tagged["side"]] = {
                "label": tagged["label"], "unit": tagged["unit"],
                "figure": figure(tagged, stats), "test": b["name"],
                "median_s": stats["median"], "min_s": stats["min"], "mean_s": stats["mean"],
                "rounds": stats["rounds"]}
            for key in ("target", "target_ratio", "target_max"):
                if key in tagged:
                    row[key] = tagged[key]
    out = []
    for name in sorted(rows, key=_order):
        row = rows[name]
        tp, base = row.get("thinpool"), row.get("baseline")
        ratio = None
        if tp and base and tp["figure"] and base["figure"]:
            ratio = (tp["figure"] / base["figure"] if tp["unit"] in HIGHER_IS_BETTER
                     else base["figure"] / tp["figure"])
        row["ratio"] = ratio
        row["met"] = _met(row, tp, ratio)
        row["verdict"] = _verdict(row, tp, ratio)
        out.append(row)
    return out


def _order(name: str):
    head = name.split(".", 1)[0]
    digits = "".join(c for c in head if c.isdigit())
    return (int(digits) if digits else 99, head, name)


def _met(row: dict, tp: dict | None, ratio: float | None) -> bool | None:
    if "target_max" in row:
        return None if tp is None else tp["figure"] < row["target_max"]
    if "target_ratio" in row:
        return None if ratio is None else ratio >= row["target_ratio"]
    return None


def _verdict(row: dict, tp: dict | None, ratio: float | None) -> str:
    if "target_max" not in row and "target_ratio" not in row:
        return ""
    if row["met"] is None:
        return "n/a (a side did not run)"
    if "target_max" in row:
        limit, got = row["target_max"], tp["figure"]
        if row["met"]:
            return f"met ({got / limit:.0%} of the limit)"
        return f"MISSED: {got / limit - 1:+.0%} over the limit"
    want = row["target_ratio"]
    if row["met"]:
        return f"met ({ratio / want:.2f}x the target)"
    return f"MISSED: needs {want / ratio:.2f}x faster"


def fmt_figure(value: float, unit: str) -> str:
    if unit == "us/op":
        return f"{value:,.1f} µs/op"
    if unit == "ms":
        return f"{value:,.2f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "s":
        return f"{value:,.3f} s"
    if unit in ("MiB/s", "ops/s"):
        return f"{value:,.0f} {unit}"
    if unit == "MiB":
        return f"{value:,.1f} MiB"
    if unit == "KiB":
        return f"{value:,.0f} KiB"
    return f"{value:g} {unit}"


def fmt_target(row: dict, sep: str = "\n") -> str:
    text = row.get("target", "")
    if "target_max" in row:
        return text or f"< {row['target_max']:g}"
    if "target_ratio" in row:
        return f"{text}{sep}(ratio >= {row['target_ratio']:.3g})" if text else \
            f"ratio >= {row['target_ratio']:.3g}"
    return "-"


def machine(raw: dict) -> dict:
    info = raw.get("machine_info", {})
    cpu = info.get("cpu", {})
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // 1024 // 1024
    except OSError:
        pass
    return {
        "cpu": cpu.get("brand_raw") or platform.processor(),
        "cpus": cpu.get("count") or os.cpu_count(),
        "memory_gib": mem,
        "system": f"{info.get('system', platform.system())} {info.get('release', platform.release())}",
        "python": info.get("python_version", platform.python_version()),
        "node": info.get("node", platform.node()),
        "datetime": raw.get("datetime"),
        "pinned": "CPU 0 (sched_setaffinity, inherited by every child process)",
    }


def render_rich(rows: list[dict], header: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="thinpool against its baselines, same run", show_lines=True,
                  caption=_caption(header))
    table.add_column("workload", max_width=44)
    table.add_column("thinpool", justify="right", max_width=28)
    table.add_column("baseline", justify="right", max_width=30)
    table.add_column("ratio", justify="right")
    table.add_column("target", max_width=24)
    table.add_column("result", max_width=26)
    for row in rows:
        cells = []
        for side in ("thinpool", "baseline"):
            s = row.get(side)
            cells.append("-" if s is None else
                         f"{fmt_figure(s['figure'], s['unit'])}\n[dim]{s['label']}[/dim]")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        style = {True: "green", False: "bold red", None: ""}[row["met"]]
        verdict = f"[{style}]{row['verdict']}[/{style}]" if style else row["verdict"]
        table.add_row(row["workload"], *cells, ratio, fmt_target(row), verdict)
    Console(width=max(150, Console().width)).print(table)


def _caption(h: dict) -> str:
    return (f"{h.get('datetime') or ''} on {h['node']}: {h['cpu']}, {h['cpus']} CPUs, "
            f"{h['memory_gib']} GiB, {h['system']}, Python {h['python']}; pinned to "
            f"{h['pinned']}. Figures: medians. Ratio > 1: thinpool better.")


def render_markdown(rows: list[dict], header: dict) -> str:
    lines = ["| workload | thinpool | baseline | ratio | target | result |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        cells = []
        for side in ("thinpool", "baseline"):
            s = row.get(side)
            cells.append("-" if s is None else f"{fmt_figure(s['figure'], s['unit'])}<br>"
                                               f"<sub>{s['label']}</sub>")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        verdict = row["verdict"]
        if row["met"] is False:
            verdict = f"**{verdict}**"
        lines.append(f"| {row['workload']} | {cells[0]} | {cells[1]} | {ratio} | "
                     f"{fmt_target(row, ' ')} | {verdict} |")
    return "\n".join(lines) + "\n\n" + _caption(header) + "\n"


def render_png(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install -e '.[bench]'") from None
    shown = [r for r in rows if r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(shown) + 1.5))
    names = [r["workload"] for r in shown][::-1]
    ratios = [r["ratio"] for r in shown][::-1]
    colours = [{True: "tab:green", False: "tab:red", None: "tab:gray"}[r["met"]]
               for r in shown][::-1]
    ax.barh(names, ratios, color=colours)
    for i, r in enumerate(shown[::-1]):
        if "target_ratio" in r:
            ax.plot([r["target_ratio"]] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
    ax.axvline(1.0, color="black", lw=0.5, ls=":")
    ax.set_xscale("log")
    marks = ratios + [r["target_ratio"] for r in shown if "target_ratio" in r] + [1.0]
    ax.set_xlim(min(marks) / 2, max(marks) * 2)
    ax.set_xlabel("ratio (> 1: thinpool better; black tick: target)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- entry point -------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the table as JSON on stdout")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--png", metavar="FILE", help="also draw the ratios (needs matplotlib)")
    parser.add_argument("-k", dest="expr", metavar="EXPR", help="only benchmarks matching EXPR")
    parser.add_argument("--basetemp", metavar="DIR", help="pytest's temporary directory")
    parser.add_argument("--save", metavar="FILE", help="keep pytest-benchmark's JSON in FILE")
    parser.add_argument("--from-json", metavar="FILE",
                        help="build the table from pytest-benchmark JSON saved earlier; run nothing")
    args, extra = parser.parse_known_args(argv)

    code = 0
    if args.from_json:
        raw = json.loads(pathlib.Path(args.from_json).read_text())
    else:
        if not pin_to_cpu0():
            print("warning: cannot pin to CPU 0; figures will be noisier", file=sys.stderr)
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="thinpool-bench-") as tmp:
            raw_path = pathlib.Path(args.save or pathlib.Path(tmp) / "raw.json")
            code = run_pytest(raw_path, args.expr, args.basetemp, extra, args.json)
            if not raw_path.exists():
                print("pytest wrote no benchmark JSON (nothing ran?)", file=sys.stderr)
                return code or 1
            raw = json.loads(raw_path.read_text())
            raw["load_average"] = {"before": load_before, "after": os.getloadavg()}
            if args.save:
                raw_path.write_text(json.dumps(raw, indent=1))

    rows = build_rows(raw)
    header = machine(raw)
    if "load_average" in raw:
        header["load_average"] = raw["load_average"]
    if args.json:
        json.dump({"machine": header, "rows": rows}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.markdown:
        sys.stdout.write(render_markdown(rows, header))
    else:
        render_rich(rows, header)
        if "load_average" in header:
            la = header["load_average"]
            print(f"load average (1, 5, 15 min): before {la['before'][0]:.2f} "
                  f"{la['before'][1]:.2f} {la['before'][2]:.2f}, after {la['after'][0]:.2f} "
                  f"{la['after'][1]:.2f} {la['after'][2]:.2f}")
    if args.png:
        render_png(rows, args.png)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
