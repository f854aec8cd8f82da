"""Runs every benchmark script and writes benchmarks/results/README.md, the table of ratios.

Usage: ``python benchmarks/run.py [--quick] [--only NAME ...] [--table-only]``. Each script runs in
its own process (so one failure does not hide the others) and writes ``results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).parent
RESULTS = HERE / "results"
NOT_BENCHMARKS = {"common.py", "run.py"}


def scripts() -> list[pathlib.Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name not in NOT_BENCHMARKS and not p.name.startswith("_"))


def table() -> str:
    rows = ["# Benchmark results", "",
            "Each ratio is ours / baseline, timed side by side in one process (see each script). "
            "Absolute times on a 2-core CPU are noise; the ratio is the figure.", "",
            "| benchmark | ours | baseline | ratio | goal | holds | device | date |", "|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.4g}"
        unit = r.get("unit", "")
        rows.append(f"| [{r['benchmark']}]({path.stem}.md) | {r['ours']:.4g} {unit} | {r['baseline']:.4g} {unit} | "
                    f"{ratio} | {r['goal']} | {'yes' if r['holds'] else '**no**'} | {r['device']} | {r['date'][:10]} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI-size runs")
    parser.add_argument("--only", nargs="*", default=None, help="script names (without .py) to run")
    parser.add_argument("--table-only", action="store_true", help="only rebuild results/README.md")
    args = parser.parse_args(argv)
    failed = []
    if not args.table_only:
        for script in scripts():
            if args.only is not None and script.stem not in args.only:
                continue
            print(f"== {script.stem}", flush=True)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(script), *(["--quick"] if args.quick else [])], cwd=HERE.parent)
            print(f"   {script.stem}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
            if proc.returncode:
                failed.append(script.stem)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "README.md").write_text(table())
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
