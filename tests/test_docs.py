"""The documentation a newcomer walks: every relative link and anchor in the README and docs/ leads
somewhere, and the chart's README is what helm-docs makes of values.yaml today."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "charts" / "petal" / "README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, broken


def test_the_readme_stays_a_map_and_docs_has_a_page_per_task():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"training.md", "kubernetes.md", "operating.md", "production.md", "faults.md", "datasets.md",
            "performance.md", "testbed.md"} <= pages  # fmt: skip


def test_the_charts_readme_is_generated_from_its_values():
    helm_docs = shutil.which("helm-docs")
    assert helm_docs, "helm-docs is not on PATH: scripts/testbed.sh install lint-tools"
    generated = subprocess.run([helm_docs, "--chart-search-root", "charts", "--sort-values-order", "file",
                                "--skip-version-footer", "--dry-run", "--log-level", "error"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert generated == (ROOT / "charts" / "petal" / "README.md").read_text(), (
        "charts/petal/README.md is stale: run helm-docs --chart-search-root charts --sort-values-order file "
        "--skip-version-footer"
    )
