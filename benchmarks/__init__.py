"""petal's speed goals, measured as ratios of contenders run side by side: `python -m benchmarks --help`."""
