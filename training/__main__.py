"""`python -m training`: the arguments first, so that a bad one fails in a fraction of a second,
before torch loads; then the trainer (training/train.py)."""

from training.config import parse_args

args = parse_args()

from training.train import main  # noqa: E402

raise SystemExit(main(args))
