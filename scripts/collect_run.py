#!/usr/bin/env python3
"""Downloads a finished run's best.pt, metrics.jsonl, curves.png and per_class.png.

python scripts/collect_run.py s3://petal/runs/demo runs/demo
"""

import argparse
import sys
from pathlib import Path

from training.artifacts import collect
from training.storage import Storage, StorageError, parse_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the run's --output, s3://BUCKET/PREFIX")
    parser.add_argument("dest", type=Path, help="local directory")
    args = parser.parse_args(argv)
    try:
        for path in collect(Storage.from_env(), parse_url(args.output), args.dest):
            print(path)
    except (StorageError, ValueError) as err:
        print(f"collect_run: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
