#!/usr/bin/env python3
"""`python scripts/submit.py …` is `petal submit …` (petal/submit.py): a training run as a PyTorchJob,
followed to the end and collected.

    python scripts/submit.py --replicas 4 --image registry.example/petal:0.1.0 --dataset s3://… --set outputPrefix=s3://…
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing it

from petal.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
