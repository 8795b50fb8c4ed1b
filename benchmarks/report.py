"""Print the results table of a saved benchmark run.

    .venv/bin/python -m benchmarks.report benchmarks/out/results.json
    .venv/bin/python -m benchmarks.report benchmarks/results/nvidia-h100-80gb-hbm3/*.json

Reads pytest-benchmark JSON files written with ``--benchmark-json`` (or committed under
``benchmarks/results/<device>/``) and prints the same table the suite prints at the end
of a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._report import build_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    args = parser.parse_args(argv)
    status = 0
    for n, path in enumerate(args.json):
        data = json.loads(path.read_text())
        table = build_table(data.get("benchmarks", []), data.get("machine_info"))
        if n:
            print()
        print(f"== {path}  ({data.get('datetime', '?')}, commit {(data.get('commit_info') or {}).get('id', '?')})")
        if table:
            print(table)
        else:
            print("no mipnet benchmark records with timings in this file")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
