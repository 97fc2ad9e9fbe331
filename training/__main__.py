"""`python -m training`: the arguments first, then what the run reads from storage (the dataset's
index, the output bucket), so that a bad argument, a missing dataset or refused credentials fail in
a second, before torch loads; then the trainer (training/train.py)."""

from training.config import parse_args
from training.exit_codes import failed, leave
from training.inputs import RunInputs

args = parse_args()
try:
    inputs = RunInputs.open(args)
except Exception as err:
    raise SystemExit(failed(err)) from None

from training.train import main  # noqa: E402

leave(main(args, inputs))
