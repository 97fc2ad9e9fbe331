"""scripts/augment_dataset.py: real downloads over HTTPS from a local server, through the real
google_images_download library; only the Google search page itself is faked (no internet here)."""

from __future__ import annotations

import io
import json
import random
import re
import ssl
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from support import ROOT, run_script, s3

from training.data import SplitStream
from training.shards import fetch_shard, read_image_bytes, read_index, read_shard_table
from training.storage import parse_url


def draw_shape(colour: str, shape: str, seed: str) -> Image.Image:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_synthetic_dataset import draw_sample

    return draw_sample(colour, shape, 96, random.Random(seed))


# The test web server's address: a loopback one of its own, which the runs admit with --allow-network
# (as a user admits a mirror), so that 127.0.0.1 and localhost stay refused like any private address.
WEB_ADDRESS = "127.0.0.2"


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files; as a hostile result could, /to-ftp/<name> redirects off http(s), /to-loopback/<name>
    to this host's 127.0.0.1, and /drip/<name> sends a byte a second."""

    def do_GET(self):
        if self.path.startswith(("/to-ftp/", "/to-loopback/")):
            where = "ftp://127.0.0.1/" if self.path.startswith("/to-ftp/") else f"https://127.0.0.1:{self.server.port}/"
            self.send_response(302)
            self.send_header("Location", where + self.path.rsplit("/", 1)[1])
            self.end_headers()
            return
        if self.path.startswith("/drip/"):
            self.send_response(200)
            self.send_header("Content-Length", "3600")
            self.end_headers()
            try:
                for _ in range(3600):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)  # the slowness itself, not a wait for anything
            except OSError:  # the client gave up on it
                return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """An HTTPS server on loopback with a self-signed certificate, and that certificate."""
    root = tmp_path_factory.mktemp("web")
    tls = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={WEB_ADDRESS}",
         "-addext", f"subjectAltName=IP:{WEB_ADDRESS},IP:127.0.0.1,DNS:localhost", "-keyout", str(tls / "key.pem"),
         "-out", str(tls / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ThreadingHTTPServer((WEB_ADDRESS, 0), partial(QuietHandler, directory=str(root)))
    server.port = server.server_address[1]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"https://{WEB_ADDRESS}:{server.port}", tls / "cert.pem"
    server.shutdown()


def smooth_random_image(seed: int, size=(160, 120), mode="RGB") -> Image.Image:
    """A photo-like image unlike any other seed's (and unlike the synthetic shapes)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
    return coarse.resize(size, Image.BICUBIC).convert(mode)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def dataset_image(storage, dataset: str, split: str, cache) -> bytes:
    url = parse_url(dataset)
    shard = read_index(storage, url)["splits"][split]["shards"][0]
    ref = next(r for r in read_shard_table(fetch_shard(storage, url, shard, cache)) if r.label == 0)
    return read_image_bytes(ref)


@pytest.fixture()
def dataset(s3_env, synthetic_dir, request) -> str:
    url = s3(f"datasets/augment-{re.sub(r'[^A-Za-z0-9._-]+', '-', request.node.name)[:100]}")
    result = run_script(s3_env, "upload_dataset.py", str(synthetic_dir), url)
    assert result.returncode == 0, result.stderr
    return url


def run_augment(s3_env, web, tmp_path, results: dict, *args: str) -> tuple[int, dict | None, str, list[dict]]:
    """augment_dataset.py as a user runs it, with only Google's result page replaced (tests/fake_google.py)."""
    _, _, cert = web
    (tmp_path / "results.json").write_text(json.dumps(results))
    log = tmp_path / "asked.jsonl"
    log.write_text("")
    env = s3_env | {"FAKE_GOOGLE_RESULTS": str(tmp_path / "results.json"), "FAKE_GOOGLE_LOG": str(log),
                    "SSL_CERT_FILE": str(cert)}  # fmt: skip
    argv = [sys.executable, str(ROOT / "tests" / "fake_google.py"), *args, "--cache-dir", str(tmp_path / "cache"),
            "--allow-network", WEB_ADDRESS]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    summary = json.loads(result.stdout.splitlines()[-1]) if result.returncode == 0 else None
    asked = [json.loads(line) for line in log.read_text().splitlines()]
    return result.returncode, summary, result.stderr, asked


def test_crafted_downloads_are_kept_or_rejected_for_the_right_reason(web, dataset, storage, s3_env, tmp_path):
    root, base, _ = web
    files = {
        "good.jpg": encoded(smooth_random_image(1), "JPEG"),
        "cmyk.jpg": encoded(smooth_random_image(2).convert("CMYK"), "JPEG"),
        "alpha.png": encoded(smooth_random_image(3, mode="RGBA"), "PNG"),
        "gray.jpg": encoded(smooth_random_image(4, mode="L"), "JPEG"),
        "truncated.jpg": encoded(smooth_random_image(5), "JPEG")[:1500],
        "empty.jpg": b"",
        "page.jpg": b"<!doctype html><html><body>403 Forbidden</body></html>",
        "tiny.jpg": encoded(smooth_random_image(6, size=(16, 16)), "JPEG"),
        "banner.jpg": encoded(smooth_random_image(7, size=(1600, 80)), "JPEG"),
        "reencoded-valid.jpg": encoded(
            Image.open(io.BytesIO(dataset_image(storage, dataset, "valid", tmp_path))).resize((120, 120)),
            "JPEG",
            quality=55,
        ),
        "copy-train.jpg": dataset_image(storage, dataset, "train", tmp_path),
        "again-good.jpg": encoded(smooth_random_image(1), "JPEG"),  # same bytes as good.jpg, another URL
        "scan.jpg": encoded(smooth_random_image(8), "TIFF"),  # a TIFF, which upload_dataset.py accepts too
        "bomb.png": encoded(Image.new("1", (10_000, 10_000)), "PNG"),  # 100 megapixels in a few kB
        "noise.png": encoded(
            Image.fromarray(np.random.default_rng(9).integers(0, 255, (300, 300, 3), np.uint8)), "PNG"
        ),  # ~270 kB, over --max-bytes below  # fmt: skip
    }
    (root / "red").mkdir(exist_ok=True)
    for name, data in files.items():
        (root / "red" / name).write_bytes(data)
    port = base.rsplit(":", 1)[1]
    # (the library picks only https:// results)
    hostile = [f"{base}/to-ftp/elsewhere.jpg", f"{base}/to-loopback/redirected.jpg",
               f"https://localhost:{port}/red/local.jpg", "https://169.254.169.254/latest/meta-data/iam.jpg",
               "https://[::1]:9/v6.jpg", "https://10.1.2.3/rfc1918.jpg", f"{base}/drip/slow.jpg"]  # fmt: skip
    results = {"red circle flower": [f"{base}/red/{name}" for name in files] + hostile}
    url = parse_url(dataset)
    before = read_index(storage, url)

    temp = tmp_path / "temp"
    temp.mkdir()
    code, summary, err, asked = run_augment(
        s3_env | {"TMPDIR": str(temp)}, web, tmp_path, results, dataset, "--classes", "red circle", "--suffix",
        "flower", "--max-bytes", "200000", "--download-seconds", "4"
    )  # fmt: skip
    assert code == 0, err
    assert not list(temp.iterdir()), "the downloads' temporary directory is removed"
    assert [a["term"] for a in asked] == ["red circle flower"]
    report = json.loads(storage.read_bytes(next(storage.list(url.join("reports")))))
    reasons = {r["url"].rsplit("/", 1)[1]: (r["reason"], r["detail"]) for r in report["rejections"]}
    assert {name: reason for name, (reason, _) in reasons.items()} == {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty",
        "page.jpg": "not-an-image",
        "tiny.jpg": "too-small",
        "banner.jpg": "extreme-aspect",
        "reencoded-valid.jpg": "near-duplicate",
        "copy-train.jpg": "exact-duplicate",
        "again-good.jpg": "exact-duplicate",
        "bomb.png": "decompression-bomb",
        "noise.png": "too-large",
        "elsewhere.jpg": "not-http",
        "redirected.jpg": "private-address",  # the first hop is admitted, the redirect is not
        "local.jpg": "private-address",  # a name that resolves to loopback
        "iam.jpg": "private-address",  # the cloud metadata service, refused before any connection
        "v6.jpg": "private-address",
        "rfc1918.jpg": "private-address",  # a private network's address, refused before any connection
        "slow.jpg": "too-slow",
    }
    assert reasons["reencoded-valid.jpg"][1].startswith("valid/")
    assert reasons["copy-train.jpg"][1].startswith("train/")
    assert summary["classes"]["red circle"]["downloaded"] == len(files) - 1 and summary["kept"] == 5
    assert "red circle" in err and "downloaded" in err  # the per-class table

    after = read_index(storage, url)
    for split in ("train", "valid", "test"):
        assert after["splits"][split] == before["splits"][split]
    kept = [
        ref
        for shard in after["splits"]["augment"]["shards"]
        for ref in read_shard_table(fetch_shard(storage, url, shard, tmp_path))
    ]
    assert sorted(r.source.rsplit("/", 1)[1] for r in kept) == ["alpha.png", "cmyk.jpg", "good.jpg", "gray.jpg",
                                                                "scan.jpg"]  # fmt: skip
    # Stored as the upload stores (what --decode gpu reads in one batch): RGB or grey JPEGs at the
    # dataset's short side; a plain JPEG that fits as it came.
    stored = {r.source.rsplit("/", 1)[1]: Image.open(io.BytesIO(read_image_bytes(r))) for r in kept}
    assert {name: (image.format, image.mode) for name, image in stored.items()} == {
        "alpha.png": ("JPEG", "RGB"), "cmyk.jpg": ("JPEG", "RGB"), "good.jpg": ("JPEG", "RGB"),
        "gray.jpg": ("JPEG", "L"), "scan.jpg": ("JPEG", "RGB")}  # fmt: skip
    (good,) = [r for r in kept if r.source.endswith("/good.jpg")]
    assert read_image_bytes(good) == files["good.jpg"]
    assert after["splits"]["augment"]["short_side"] == before["splits"]["train"]["short_side"]
    assert {r.label for r in kept} == {0}

    stream = SplitStream(storage, url, after, ["train", "augment"], tmp_path)  # --train-splits train,augment
    refs = stream.epoch_refs(seed=0, epoch=1, rank=0, world_size=1, shuffle=True)
    assert len(refs) == 205 and {r.source for r in kept} <= {r.source for r in refs}

    # Safe to re-run: the same search finds nothing new to store.
    code, again, err, _ = run_augment(s3_env, web, tmp_path, results, dataset, "--classes", "1", "--suffix", "flower",
                                      "--max-bytes", "200000", "--download-seconds", "4")  # fmt: skip
    assert code == 0, err
    assert again["kept"] == 0 and again["classes"]["red circle"]["duplicate-url"] == 5  # the kept ones
    assert read_index(storage, url) == after


@pytest.mark.slow
def test_relevance_rejects_images_the_trained_model_places_elsewhere(web, dataset, reference_run, s3_env, tmp_path):
    root, base, _ = web
    (root / "rel").mkdir(exist_ok=True)
    draw_shape("red", "circle", "relevance/circle").save(root / "rel" / "circle.jpg")
    draw_shape("blue", "square", "relevance/square").save(root / "rel" / "square.jpg")
    results = {"red circle": [f"{base}/rel/circle.jpg", f"{base}/rel/square.jpg"]}
    output, _ = reference_run
    code, summary, err, _ = run_augment(
        s3_env, web, tmp_path, results, dataset, "--classes", "red circle",
        "--relevance", f"{output}/best.pt", "--relevance-top-k", "1", "--near-distance", "0",
    )  # fmt: skip
    assert code == 0, err
    assert summary["classes"]["red circle"] == {"downloaded": 2, "kept": 1, "irrelevant": 1}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--classes", "blue moon"], "--classes blue moon: not in the dataset"),
        (["--limit", "500"], "--limit 500 above 100 needs --chromedriver"),
        (["--split", "valid"], "--split valid would change an original split"),
    ],
)
def test_bad_arguments_get_one_line_and_change_nothing(web, dataset, storage, s3_env, tmp_path, args, expected):
    before = read_index(storage, parse_url(dataset))
    code, _, err, asked = run_augment(s3_env, web, tmp_path, {}, dataset, *args)
    assert code == 2 and expected in err and err.strip().count("\n") == 0
    assert not asked and read_index(storage, parse_url(dataset)) == before


def test_the_chromedriver_path_reaches_the_library(web, dataset, s3_env, tmp_path):
    code, summary, err, asked = run_augment(
        s3_env,
        web,
        tmp_path,
        {},
        dataset,
        "--classes",
        "2",
        "--limit",
        "150",
        "--chromedriver",
        "/usr/bin/chromedriver",
    )
    assert code == 0, err
    assert asked == [{"term": "blue square", "chromedriver": "/usr/bin/chromedriver"}] and summary["kept"] == 0
