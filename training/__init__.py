"""petal's trainer: `python -m training --help`. Importing the package pulls in no torch."""
