"""The trainer end to end: real MinIO, real multi-process DDP under torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from support import ROOT, SMALL_TRAINING, FaultyProxy, Watched, run_script, s3, trainer, wait_ok, without_modules

from training import checkpoint
from training.config import parse_args
from training.storage import parse_url

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def final_weights(storage, output: str, epoch: int) -> dict:
    return checkpoint.deserialize(storage.read_bytes(parse_url(output).join(checkpoint.checkpoint_name(epoch))))


@pytest.mark.slow
def test_two_ranks_learn_the_synthetic_set_and_write_every_artifact(reference_run, storage):
    output, proc = reference_run
    records = proc.json_lines()
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert all(r["train_samples"] == 200 and r["val_samples"] == 100 for r in epochs), epochs

    done = json.loads(proc.stdout[-1])
    assert done["event"] == "done" and done["epochs"] == 4
    assert done["best_val_acc"] >= 0.9, epochs
    assert done["best_val_acc"] == max(r["val_acc"] for r in epochs)
    assert done["checkpoint"] == f"{output}/best.pt"

    out = parse_url(output)
    metrics = [json.loads(line) for line in storage.read_bytes(out.join("metrics.jsonl")).decode().splitlines()]
    assert [{k: v for k, v in m.items() if k != "val_per_class_acc"} for m in metrics] == epochs
    assert all(len(m["val_per_class_acc"]) == 5 for m in metrics)

    best_bytes = storage.read_bytes(out.join("best.pt"))
    assert best_bytes == storage.read_bytes(out.join(checkpoint.checkpoint_name(done["best_epoch"])))  # its copy
    best = checkpoint.deserialize(best_bytes)
    assert best["best_val_acc"] == done["best_val_acc"]
    assert best["classes"] == ["red circle", "blue square", "yellow triangle", "green cross", "purple ring"]
    assert best["config"]["arch"] == "resnet18" and set(best) >= {"model", "optimizer", "scaler", "history"}

    latest = json.loads(storage.read_bytes(out.join("latest")))
    assert latest["checkpoint"] == "checkpoints/epoch-0004.pt"
    kept = sorted(str(u).rsplit("/", 1)[1] for u in storage.list(out.join("checkpoints")))
    assert kept == [f"epoch-000{e}.{kind}" for e in (2, 3, 4) for kind in ("pt", "sha256")]  # --keep-checkpoints 3
    for picture in ("curves.png", "per_class.png"):
        assert storage.read_bytes(out.join(picture)).startswith(PNG_MAGIC)


@pytest.mark.slow
def test_predict_classifies_held_out_images_with_the_best_checkpoint(reference_run, s3_env, synthetic_dir):
    output, _ = reference_run
    images = sorted((synthetic_dir / "test").glob("*/*.jpg"))
    names = json.loads((synthetic_dir / "cat_to_name.json").read_text())
    result = run_script(s3_env, "predict.py", f"{output}/best.pt", *map(str, images), "--top-k", "3", "--json")
    assert result.returncode == 0, result.stderr
    predictions = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["image"] for p in predictions] == list(map(str, images))
    assert all(len(p["top"]) == 3 and p["top"][0]["probability"] >= p["top"][1]["probability"] for p in predictions)
    correct = sum(p["top"][0]["class"] == names[os.path.basename(os.path.dirname(p["image"]))] for p in predictions)
    assert correct / len(predictions) >= 0.9


@pytest.mark.slow
def test_kill_during_checkpoint_upload_never_leaves_latest_on_a_torn_object(
    minio, s3_env, synthetic_dataset, run_dir, storage
):
    out = parse_url(run_dir)
    caught = checkpoint.checkpoint_name(1, 6)  # of the epoch's 7 steps (200 samples, 2 ranks of 16)
    proxy = FaultyProxy(minio.port, f"PUT /{out.bucket}/{out.key}/{re.escape(caught)}".encode())
    args = ["--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING, "--epochs", "1",
            "--checkpoint-every", "3"]  # fmt: skip
    proc = trainer(s3_env | {"S3_ENDPOINT_URL": proxy.endpoint}, args)
    assert proxy.matched.wait(600), f"the {caught} upload never started:\n" + "\n".join(proc.stderr[-20:])
    os.kill(proc.rank_pid(0), signal.SIGKILL)  # rank 0 is the writer, caught mid-upload
    assert proc.wait(120) != 0
    proxy.close()

    latest = json.loads(storage.read_bytes(out.join("latest")))
    assert latest["checkpoint"] == checkpoint.checkpoint_name(1, 3)
    named = storage.read_bytes(out.join(latest["checkpoint"]))
    assert len(named) == latest["bytes"] and checkpoint.deserialize(named)["stretches"][-1]["steps"] == 3
    assert not storage.exists(out.join(caught))

    rerun = trainer(s3_env, args)
    wait_ok(rerun)
    assert [r for r in rerun.json_lines() if r["event"] == "resumed"] == [{"event": "resumed", "epoch": 1, "step": 3}]
    assert [r["epoch"] for r in rerun.json_lines() if r["event"] == "epoch"] == [1]


@pytest.mark.slow
def test_training_rides_out_a_minio_restart(minio, s3_env, synthetic_dataset, run_dir, storage):
    outage = FaultyProxy(minio.port)  # MinIO as this run sees it: going away and coming back
    proc = trainer(s3_env | {"S3_ENDPOINT_URL": outage.endpoint},
                   ["--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING, "--epochs", "2"])  # fmt: skip
    try:
        proc.wait_for_line(r'"event": "epoch", "epoch": 1,', timeout=600)
        outage.down()
        proc.wait_for_line(r"retrying in", timeout=300)
    finally:
        outage.up()
    wait_ok(proc)
    outage.close()
    done = json.loads(proc.stdout[-1])
    assert done["event"] == "done"
    assert [r["epoch"] for r in proc.json_lines() if r["event"] == "epoch"] == [1, 2]
    # What `petal list` shows: the run's last word, not a record from before the outage.
    progress = json.loads(storage.read_bytes(parse_url(run_dir).join("progress.json")))
    assert (progress["state"], progress["epoch"], progress["best_val_acc"]) == ("done", 2, done["best_val_acc"])


@pytest.mark.slow
def test_uneven_rank_shares_finish_without_hanging(s3_env, synthetic_dataset, run_dir):
    # 100 samples over 3 ranks at batch size 1: one rank has 34 steps, the others 33.
    args = [
        "--data",
        synthetic_dataset,
        "--output",
        run_dir,
        "--train-splits",
        "valid",
        *SMALL_TRAINING,
        "--epochs",
        "1",
        "--batch-size",
        "1",
        "--log-every",
        "50",
    ]
    proc = trainer(s3_env, args, nproc=3)
    wait_ok(proc, timeout=600)
    assert proc.json_lines()[0]["train_samples"] == 100


def one_line_failure(env: dict, *args: str, timeout: float = 90) -> str:
    """The one line `python -m training` fails with (and nothing else, no secret in it)."""
    proc = Watched([sys.executable, "-m", "training", *args], env)
    code = proc.wait(timeout=timeout)
    assert code != 0
    output = "\n".join(proc.stdout + proc.stderr)
    assert env["AWS_SECRET_ACCESS_KEY"] not in output
    assert len(proc.stderr) == 1 and not proc.stdout, output
    return proc.stderr[0]


# What a run can be told wrong, the line that says so, and whether it is found before torch loads (with
# torch unimportable, the same line comes: an argument, storage or the dataset's index is wrong).
BEFORE_TORCH, NEEDS_TORCH = True, False


@pytest.mark.parametrize(
    ("change", "args", "expected", "before_torch"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "not-the-secret-123"}, [], "SignatureDoesNotMatch", BEFORE_TORCH),
        ({"AWS_ACCESS_KEY_ID": "nobody"}, [], "InvalidAccessKeyId", BEFORE_TORCH),
        ({}, ["--output", "s3://no-such-bucket/run"], "bucket 'no-such-bucket' does not exist", BEFORE_TORCH),
        ({}, ["--data", "{s3}/datasets/absent"], "no dataset at {s3}/datasets/absent", BEFORE_TORCH),
        ({}, ["--val-split", "holdout"], "split(s) holdout not in the dataset; it has test,", BEFORE_TORCH),
        ({}, ["--arch", "resnet9"], "invalid choice: 'resnet9'", BEFORE_TORCH),
        ({}, ["--freeze", "layer2"], "invalid choice: 'layer2'", BEFORE_TORCH),
        ({}, ["--data", "/local/path"], "'/local/path' is not an object-storage URL", BEFORE_TORCH),
        ({}, ["--epochs", "0"], "'0' must be >= 1", BEFORE_TORCH),
        ({}, ["--pretrained", "{s3}/weights/absent.pt"], "--pretrained {s3}/weights/absent.pt does not exist",
         NEEDS_TORCH),
        ({}, ["--pretrained", "imagenet-v9"], "'imagenet-v9' is not imagenet, none or s3://BUCKET/KEY", BEFORE_TORCH),
        ({}, ["--decode", "gpu"], "--decode gpu needs a GPU; this rank runs on cpu", NEEDS_TORCH),
        ({"PETAL_EPOCHS": "0"}, [], "argument --epochs: '0' must be >= 1 (from PETAL_EPOCHS)", BEFORE_TORCH),
        ({"PETAL_FEATURE_CACHE": "maybe"}, [], "PETAL_FEATURE_CACHE='maybe': expected true or false", BEFORE_TORCH),
        ({"MLFLOW_TRACKING_URI": "http://petal:hunter2@mlflow.example:5000"}, [],
         "MLFLOW_TRACKING_URI carries credentials (user:password@): give them as MLFLOW_TRACKING_", BEFORE_TORCH),
        ({}, ["--mlflow-experiment", ""], "argument --mlflow-experiment: must not be empty", BEFORE_TORCH),
    ],
)  # fmt: skip
def test_bad_input_gets_one_line_naming_the_problem(s3_env, synthetic_dataset, run_dir, tmp_path, change, args,
                                                    expected, before_torch):  # fmt: skip
    """(`{s3}` stands for the session's bucket: a test's name must be the same on every pytest-xdist worker.)"""
    env = s3_env | change | (without_modules(tmp_path / "no-torch", "torch", "torchvision") if before_torch else {})
    base = ["--data", synthetic_dataset, "--output", run_dir, "--arch", "resnet18", "--pretrained", "none"]
    line = one_line_failure(env, *base, *(arg.format(s3=s3("").rstrip("/")) for arg in args))
    assert expected.format(s3=s3("").rstrip("/")) in line
    assert "hunter2" not in line  # a password given where it should not be is not repeated


def test_a_process_whose_reader_is_gone_still_exits_with_its_own_code():
    """`predict.py … | head -1`: what is left in stdout's buffer cannot be written, and the exit code is
    still the one `leave` was given, not a traceback's 1."""
    reader, writer = os.pipe()
    os.close(reader)
    script = "import sys\nfrom training.exit_codes import leave\nsys.stdout.write('unread')\nleave(3)"
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    ended = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=buffered, stdout=writer,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    os.close(writer)
    assert (ended.returncode, ended.stderr) == (3, "")


def test_options_come_from_the_environment_where_no_flag_gives_them():
    """What a TrainJob started by the Kubeflow SDK gives the trainer: variables, no arguments."""
    environ = {"PETAL_DATA": "s3://abc/data", "PETAL_OUTPUT": "s3://abc/run", "PETAL_EPOCHS": "3",
               "PETAL_BATCH_SIZE": "7", "PETAL_FEATURE_CACHE": "false",
               "PETAL_TRAIN_SPLITS": "train,augment"}  # fmt: skip
    parsed = parse_args(["--epochs", "5"], environ=environ)
    assert (parsed.data, parsed.output, parsed.batch_size, parsed.train_splits) == ("s3://abc/data", "s3://abc/run",
                                                                                     7, "train,augment")  # fmt: skip
    assert parsed.epochs == 5 and parsed.feature_cache is False  # the flag wins; a boolean takes false
    assert parse_args([], environ=environ | {"PETAL_FEATURE_CACHE": "TRUE"}).feature_cache is True
    assert vars(parse_args(["--data", "s3://abc/d", "--output", "s3://abc/o"], environ={})) == vars(
        parse_args([], environ={"PETAL_DATA": "s3://abc/d", "PETAL_OUTPUT": "s3://abc/o"})
    )


@pytest.fixture(scope="module")
def untrusted_tls_endpoint(tmp_path_factory) -> str:
    """An HTTPS server whose certificate no CA vouches for."""
    tls = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tls / "key.pem"),
                    "-out", str(tls / "cert.pem")], check=True, capture_output=True)  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://no-such-host.invalid:9000", "NameResolutionError"),
        ("{tls}", "CERTIFICATE_VERIFY_FAILED"),
    ],
)
def test_storage_that_cannot_work_fails_in_seconds_not_after_the_retry_window(
    s3_env, run_dir, untrusted_tls_endpoint, endpoint, expected
):
    env = s3_env | {"S3_ENDPOINT_URL": endpoint.format(tls=untrusted_tls_endpoint), "PETAL_S3_RETRY_SECONDS": "120"}
    started = time.monotonic()
    line = one_line_failure(env, "--data", s3("datasets/synthetic"), "--output", run_dir, timeout=60)
    assert expected in line and line.endswith("(exit 5)") and time.monotonic() - started < 30, line


def test_a_cluster_dns_that_does_not_answer_is_waited_out_like_a_storage_outage(minio, run_dir, tmp_path):
    """A busy cluster DNS times out (EAI_AGAIN): not a name that does not exist, so storage calls are
    retried until it answers. Here the process's resolver answers nothing (its own mount namespace),
    until its hosts file learns the name."""
    hosts, resolver = tmp_path / "hosts", tmp_path / "resolv.conf"
    hosts.write_text("127.0.0.1 localhost\n")
    resolver.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")  # nobody answers there
    env = minio.env
    check = (f"from training.storage import Storage, parse_url; "
             f"Storage('http://minio.petal.test:{minio.port}', {env['AWS_ACCESS_KEY_ID']!r}, "
             f"{env['AWS_SECRET_ACCESS_KEY']!r}, retry_seconds=120)"
             f".require_bucket(parse_url({run_dir!r}))")  # fmt: skip
    namespaced = f'mount --bind {hosts} /etc/hosts && mount --bind {resolver} /etc/resolv.conf && exec "$@"'
    proc = Watched(["unshare", "--mount", "sh", "-c", namespaced, "sh", sys.executable, "-c", check], os.environ)
    line = proc.wait_for_line("retrying in", timeout=60)
    assert "Temporary failure in name resolution" in line, line
    with hosts.open("a") as appended:  # the same file the namespace sees
        appended.write("127.0.0.1 minio.petal.test\n")
    assert proc.wait(60) == 0, "\n".join(proc.stderr[-5:])


@pytest.mark.slow
def test_resuming_with_a_dataset_of_other_classes_is_refused(reference_run, s3_env, tmp_path):
    made = run_script(s3_env, "make_synthetic_dataset.py", str(tmp_path), "--classes", "3", "--per-class", "4")
    assert made.returncode == 0, made.stderr
    uploaded = run_script(s3_env, "upload_dataset.py", str(tmp_path), s3("datasets/three-classes"))
    assert uploaded.returncode == 0, uploaded.stderr
    output, _ = reference_run
    line = one_line_failure(s3_env, "--data", s3("datasets/three-classes"), "--output", output, *SMALL_TRAINING)
    assert "has 3 classes, the checkpoint was trained on 5 (different classes)" in line


SLOW = pytest.mark.slow


@pytest.mark.parametrize("content", [b"not a checkpoint at all", pytest.param(b"PK\x03\x04 torn zip", marks=SLOW),
                                     pytest.param("tensor", marks=SLOW)])  # fmt: skip
def test_a_file_that_is_not_a_checkpoint_gets_one_line_from_predict_and_from_pretrained(
    s3_env, storage, synthetic_dataset, synthetic_dir, run_dir, tmp_path, content
):
    path = tmp_path / "best.pt"
    if content == "tensor":  # a real torch file, but not a petal checkpoint nor a state_dict
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    image = str(next((synthetic_dir / "test").glob("*/*.jpg")))
    predicted = run_script(s3_env, "predict.py", str(path), image)
    assert predicted.returncode == 2 and predicted.stderr.count("\n") == 1, predicted.stderr
    assert str(path) in predicted.stderr and "Traceback" not in predicted.stderr

    url = s3(f"weights/foreign-{len(path.read_bytes())}.pt")
    storage.write_bytes(parse_url(url), path.read_bytes())
    line = one_line_failure(s3_env, "--data", synthetic_dataset, "--output", run_dir, "--arch", "resnet18",
                            "--pretrained", url)  # fmt: skip
    assert f"--pretrained {url} is not a torch state_dict" in line and line.endswith("(exit 6)")
