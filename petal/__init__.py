"""The operator's side of petal: the `petal` command (submit, list, status, logs, cancel, collect,
tensorboard) and the chart it renders jobs from. Never imports torch.

    petal --help
"""

from __future__ import annotations

import sys
from pathlib import Path


def installed(relative: str) -> Path:
    """A file petal ships beside its code: from the checkout it runs from (an editable install, the
    scripts), else from the data `pip install` put under <prefix>/share/petal."""
    for root in (Path(__file__).resolve().parents[1], Path(sys.prefix) / "share" / "petal"):
        if (root / relative).exists():
            return root / relative
    raise FileNotFoundError(f"{relative} is neither in petal's checkout nor in {sys.prefix}/share/petal")
