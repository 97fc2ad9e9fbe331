"""petal's trainer: `python -m training --help`. Importing the package pulls in no torch."""

import sys
import time

# When this process began to be petal (before torch is imported): start-up is measured from here.
STARTED = time.monotonic()


def log(message: str) -> None:
    """A line for the operator: stderr, prefixed, flushed at once (a pod's log is read as it is written)."""
    print(f"petal: {message}", file=sys.stderr, flush=True)
