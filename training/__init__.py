"""petal's trainer: `python -m training --help`. Importing the package pulls in no torch."""

import time

# When this process began to be petal (before torch is imported): start-up is measured from here.
STARTED = time.monotonic()
