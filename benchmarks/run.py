"""The benchmark suite: every figure of issue #9 as a ratio measured in one process, against targets.

    .venv/bin/python -m benchmarks.run                 # full run (minutes): writes benchmarks/results.json
    .venv/bin/python -m benchmarks.run --quick         # smoke run (small n, < ~1 min per module)
    .venv/bin/python -m benchmarks.run --only fig_projection --quick --out /tmp/r.json

Figures live in `benchmarks/fig_*.py`; each module lists `FIGURES = [fn, ...]`, and each
`fn(quick: bool) -> dict` returns `name`, `value` (float), `target` ("≥ 0.7" / "≤ 0.3"), `met`
(bool or None), `unit` and `details` (the raw measurements). The machine is shared and noisy, so a
figure is always a ratio against a baseline measured in the same process (interleaved, medians of
repeats); the load average before and after is recorded beside it. A figure that raises is reported
as an error in the table and the exit status is 1; the other figures still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
KEYS = ("name", "value", "target", "met", "unit", "details")


def discover(only: list[str] | None = None) -> list[str]:
    """Module names `fig_*` in this folder (all, or those named in `only`), sorted."""
    names = sorted(p.stem for p in HERE.glob("fig_*.py"))
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise SystemExit(f"no figure module {', '.join(missing)} in {HERE}; have {', '.join(names)}")
        names = [n for n in names if n in only]
    return names


def check(fig: dict) -> dict:
    """A figure's dict with every key present and a finite float value (else ValueError)."""
    missing = [k for k in KEYS if k not in fig]
    if missing:
        raise ValueError(f"figure result lacks {missing}")
    value = float(fig["value"])
    if not math.isfinite(value):
        raise ValueError(f"figure {fig['name']!r} has a non-finite value {value}")
    return {**fig, "value": value}


def run_module(name: str, quick: bool) -> list[dict]:
    """Every figure of one module; a module or figure that raises becomes an `error` row."""
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        figures = list(module.FIGURES)
    except Exception:
        return [{"module": name, "name": name, "error": traceback.format_exc(limit=3)}]
    rows = []
    for fn in figures:
        start, load = time.perf_counter(), os.getloadavg()
        try:
            row = check(fn(quick))
        except Exception:
            row = {"name": getattr(fn, "__name__", str(fn)), "error": traceback.format_exc(limit=5)}
        row.update(
            module=name,
            seconds=round(time.perf_counter() - start, 1),
            loadavg_before=load,
            loadavg_after=os.getloadavg(),
        )
        rows.append(row)
        print(
            f"  {row['name']}: "
            + (
                f"{row['value']:.3g} {row.get('unit', '')} (target {row['target']})"
                if "error" not in row
                else "ERROR " + row["error"].strip().splitlines()[-1]
            ),
            flush=True,
        )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the figures: value, target, met, seconds, load average before/after."""
    lines = ["| figure | value | target | met | seconds | load before → after |", "|---|---|---|---|---|---|"]
    for r in rows:
        load = f"{r['loadavg_before'][0]:.1f} → {r['loadavg_after'][0]:.1f}" if "loadavg_before" in r else ""
        if "error" in r:
            last = r["error"].strip().splitlines()[-1]
            lines.append(f"| {r['name']} | ERROR: {last} | | | {r.get('seconds', '')} | {load} |")
            continue
        met = {True: "yes", False: "**no**", None: "n/a"}[r["met"]]
        lines.append(
            f"| {r['name']} | {r['value']:.3g} {r['unit']} | {r['target']} | {met} | {r['seconds']} | {load} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small n and budgets: checks every figure is produced")
    ap.add_argument("--only", default="", help="comma-separated figure modules, e.g. fig_projection,fig_red")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default benchmarks/results.json, or results-quick.json with --quick)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = the CPU count)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    names = discover([n.strip() for n in args.only.split(",") if n.strip()])
    info = machine() | {"quick": args.quick, "modules": names, "loadavg_before": os.getloadavg()}
    print(
        f"benchmarks ({'quick' if args.quick else 'full'}): {', '.join(names)}; "
        f"{info['cpu_count']} CPUs, torch {info['torch']}, {info['torch_threads']} threads",
        flush=True,
    )
    rows = []
    for name in names:
        print(f"{name}:", flush=True)
        rows += run_module(name, args.quick)
    info["loadavg_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "figures": rows}, indent=2, default=float) + "\n")
    print("\n" + table(rows))
    print(f"\nload average (1, 5, 15 min) before {info['loadavg_before']}, after {info['loadavg_after']}")
    print(f"wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
