"""The benchmarks keep running and keep reporting what docs/performance.md quotes (their numbers are not asserted)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from PIL import Image
from support import ROOT, without_modules

from benchmarks import network
from benchmarks.photos import PHOTOS, make_photos, photo
from training.storage import parse_url


@pytest.mark.slow
def test_the_data_benchmark_reports_every_contender_and_ratio(s3_env, tmp_path):
    # One round: thirteen contenders, six of them a process of the peers' venv each (imports: seconds)
    argv = [sys.executable, "-m", "benchmarks", "data", "--json", str(tmp_path / "data.json"), "--images", "32",
            "--rounds", "1", "--workers", "1"]  # fmt: skip
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # torch's compile cache dir is made in TMPDIR at `import torchvision` unless named (then, as it is in any
    # process that imported torchvision before: the assertion is on the benchmark's own files)
    env = s3_env | {"TMPDIR": str(scratch), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(scratch.iterdir()), "its scratch directory is removed"
    figures = json.loads((tmp_path / "data.json").read_text())
    peers = ["webdataset", "streaming", "litdata"]
    reading_minio = ["shards", "per_object_get", *peers]
    assert set(figures["images_per_s"]) == {"imagefolder", "imagefolder_best", "decode_limit", *reading_minio,
                                            *(f"{name}_at_5ms" for name in reading_minio)}  # fmt: skip
    assert all(value > 0 for value in figures["images_per_s"].values())
    # Each contender's MB/s is of what it fetched: the shards (every stored byte inside them), each stored
    # image once, the original files.
    read, setup = figures["read_mb"], figures["setup"]
    assert read["shards"] == read["shards_at_5ms"] == setup["shards_mb"] >= setup["stored_mb"]
    assert read["per_object_get"] == pytest.approx(setup["stored_mb"])
    assert read["imagefolder"] == read["imagefolder_best"] == setup["original_mb"]
    # Each peer's own format holds the stored images' bytes (and its own framing and index)
    assert all(read[name] == read[f"{name}_at_5ms"] >= setup["stored_mb"] for name in peers)
    assert read["decode_limit"] == 0 and all(figures["mb_per_s"][name] > 0 for name in read if read[name])
    against_peers = [f"shards_vs_{name}{at}" for name in peers for at in ("", "_at_5ms")]
    assert set(figures["ratios"]) == {"shards_vs_imagefolder", "shards_vs_imagefolder_best", "shards_vs_per_object_get",
                                      "shards_vs_per_object_get_at_5ms", "shards_vs_decode_limit",
                                      *against_peers}  # fmt: skip
    assert all(figures["goals"][name] == 1.0 for name in against_peers)
    # The proxy really is in the way: a GET through it pays the two 5 ms legs, whatever the loopback
    # GET costs on a busy machine (its median moves by milliseconds from one moment to the next).
    assert figures["get_ms"]["at_5ms"] >= 10
    assert figures["get_ms"]["at_5ms"] > figures["get_ms"]["loopback"]
    # Why a stored image decodes faster (the milliseconds are reported, not asserted: a busy machine moves them)
    assert 0 < setup["stored_megapixels_per_image"] < setup["original_megapixels_per_image"]
    assert all(ms > 0 for ms in figures["decode_ms_per_image"].values())
    assert "shards_vs_imagefolder" in result.stdout
    assert 0 < setup["original_jpeg_bytes_per_pixel"] < 3  # 24 bits per pixel before compression
    assert setup["original_megapixels_per_image"] > 0


def test_the_data_benchmark_without_its_peers_says_how_to_install_them(s3_env, tmp_path):
    env = {k: v for k, v in s3_env.items() if k != "PETAL_PEERS_PYTHON"}
    argv = [sys.executable, "-m", "benchmarks", "data", "--workdir", str(tmp_path)]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "PETAL_PEERS_PYTHON '' is not the peers' venv's python" in result.stderr
    assert "scripts/testbed.sh install peers" in result.stderr
    assert not list(tmp_path.iterdir()), "nothing is made before the refusal"


def test_the_benchmark_photos_are_every_shipped_photograph_cropped_never_upscaled(tmp_path):
    out = make_photos(tmp_path / "photos", classes=len(PHOTOS), per_class=3)
    names = json.loads((out / "cat_to_name.json").read_text())
    assert list(names.values()) == [name.removesuffix(".jpg") for name in PHOTOS]
    for number, name in zip(names, PHOTOS, strict=True):
        source = photo(name)
        for file in (out / number).glob("*.jpg"):
            with Image.open(file) as image:
                assert min(image.size) <= min(500, *source.size), (file.name, image.size, source.size)


def test_a_latency_proxy_that_cannot_be_set_up_stops_its_server(monkeypatch, s3_env):
    """Its listening port taken: setting the proxy up fails inside __enter__, which gets no __exit__."""
    monkeypatch.setenv("PATH", s3_env["PATH"])
    with socket.create_server(("127.0.0.1", 0)) as taken:
        ports = iter([network.free_port(), taken.getsockname()[1]])  # the API's port, then the proxy's
        monkeypatch.setattr(network, "free_port", lambda: next(ports))
        latency = network.Latency(s3_env["S3_ENDPOINT_URL"], milliseconds=5)
        with pytest.raises(OSError):  # the API's refusal (an HTTPError)
            with latency:
                pass
    assert latency.process.poll() is not None, "toxiproxy-server is still running"


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_code_paths_on_cpu_and_a_failing_section_loses_no_other(tmp_path):
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--json", str(tmp_path / "gpu.json"),
            "--fail", "fc_only/resnet50"]  # fmt: skip
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu.json").read_text())
    errors = {name: value["error"] for name, value in figures.items() if isinstance(value, dict) and "error" in value}
    assert errors == {"fc_only/resnet50": "RuntimeError: made to fail (--fail)"}
    trained = {name: value for name, value in figures.items() if name.startswith("train_img_per_s/")}
    assert len(trained) == 8 and all(value > 0 for value in trained.values())
    assert "train_img_per_s/resnet50/fp32" in trained  # no TF32 on the CPU: labelled as what ran
    assert figures["fc_only/resnet152"]["flowers_12_epoch_speedup"] > 1
    assert figures["petal_pipeline"]["decode_cpu"]["img_per_s"] > 0  # petal's ImageEpochs + train_one_epoch
    stall = figures["checkpoint_stall"]["stall_seconds"]  # checkpoint.to_host against the write in the loop
    assert stall["async"] > 0 and stall["sync"] > 0 and figures["checkpoint_stall"]["tensor_bytes"] > 100e6
    decode = figures["jpeg_decode_img_per_s"]
    assert decode["cpu_pil"] > 0 and decode["cpu_torchvision"] > 0 and decode["gpu_nvjpeg"] is None  # no GPU here


def test_the_gpu_benchmark_answers_with_only_torch_and_refuses_a_machine_without_cuda(tmp_path):
    """Only torch installed (torchvision and PIL unimportable): exit 0 and every section that needs them
    skipped with the reason; no CUDA and no --smoke: exit 2 and one line."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--json", str(tmp_path / "bare.json")]
    only_torch = os.environ | without_modules(tmp_path / "blocker", "torchvision", "PIL")
    bare = subprocess.run(argv, cwd=tmp_path, env=only_torch, capture_output=True, text=True, timeout=300)
    assert bare.returncode == 0, bare.stderr[-2000:]
    figures = json.loads((tmp_path / "bare.json").read_text())
    assert figures["torch"] and figures["train_img_per_s/resnet50/fp32"]["error"].endswith("cannot be imported")
    assert "PIL" in figures["jpeg_decode_img_per_s"]["error"]

    no_gpu = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert no_gpu.returncode == 2 and no_gpu.stderr.count("\n") == 1 and "no CUDA device" in no_gpu.stderr


def test_the_submit_benchmark_times_the_dry_run_without_torch(tmp_path):
    argv = [sys.executable, "-m", "benchmarks", "submit", "--json", str(tmp_path / "submit.json")]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "submit.json").read_text())
    assert figures["seconds"] > 0 and len(figures["all_seconds"]) == 5 and figures["imports_torch"] is False


def test_the_checkpoint_benchmark_times_both_ways_and_leaves_nothing_behind(s3_env, storage, tmp_path):
    argv = [sys.executable, "-m", "benchmarks", "checkpoint", "--arch", "resnet18", "--rounds", "1",
            "--json", str(tmp_path / "checkpoint.json")]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, env=s3_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "checkpoint.json").read_text())
    assert figures["bytes"] > 100e6  # resnet18's weights and Adam's two moments
    stall = figures["stall_seconds"]
    assert 0 < stall["async"] <= figures["landed_seconds"]["async"] and stall["sync"] > 0
    assert figures["ratios"]["stall_async_vs_sync"] == stall["async"] / stall["sync"]
    # the sync write serializes the whole state in the loop: at least its size held at once
    assert figures["peak_host_mb"]["sync"] >= figures["bytes"] / 1e6 * 0.9 and figures["peak_host_mb"]["async"] > 0
    assert not list(storage.list(parse_url("s3://petal/bench/checkpoints")))
