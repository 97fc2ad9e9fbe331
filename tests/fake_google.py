"""Runs scripts/augment_dataset.py with Google's result page replaced — the one thing that needs the
internet — by the image URLs listed in a JSON file; everything after the search (downloads over
HTTPS, filtering, storage) is the real code.

    FAKE_GOOGLE_RESULTS=results.json FAKE_GOOGLE_LOG=asked.jsonl python tests/fake_google.py s3://… [args]

results.json: {"<search term>": ["https://…/a.jpg", ...]}; each search is logged as
{"term": ..., "chromedriver": ...} to FAKE_GOOGLE_LOG.
"""

import json
import os
import runpy
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from google_images_download.google_images_download import googleimagesdownload

RESULTS = json.loads(Path(os.environ["FAKE_GOOGLE_RESULTS"]).read_text())
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "augment_dataset.py"


def results_page(self, url: str, chromedriver: str | None) -> str:
    term = parse_qs(urlparse(url).query)["q"][0]
    with open(os.environ["FAKE_GOOGLE_LOG"], "a") as log:
        log.write(json.dumps({"term": term, "chromedriver": chromedriver}) + "\n")
    # The page format the library's parser looks for: ["<image url>",height,width]
    return "".join(f'["{link}",{i},{i}]' for i, link in enumerate(RESULTS.get(term, [])))


googleimagesdownload.download_extended_page = results_page
sys.argv[0] = str(SCRIPT)
runpy.run_path(str(SCRIPT), run_name="__main__")
