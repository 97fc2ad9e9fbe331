"""Faults lose at most a few steps: step-level checkpoints, SIGTERM, a resume on another world size,
rank 0 deciding the resume point, checkpoints that are not trusted blindly, and exit codes that tell
a restart whether it can help. Real MinIO, real multi-process DDP
(petal's launcher and hand-launched ranks)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys

import pytest
import torch
from minio.credentials import StaticProvider
from minio.minioadmin import MinioAdmin
from support import SMALL_TRAINING, FaultyProxy, Watched, launcher, pods, s3, trainer, wait_ok

from training import checkpoint
from training.storage import parse_url

pytestmark = pytest.mark.slow


def final_weights(storage, output: str, epoch: int) -> dict:
    return checkpoint.deserialize(storage.read_bytes(parse_url(output).join(checkpoint.checkpoint_name(epoch))))


def epochs_of(proc) -> list[dict]:
    return [r for r in proc.json_lines() if r["event"] == "epoch"]


def resumed_event(proc) -> dict:
    (event,) = [r for r in proc.json_lines() if r["event"] == "resumed"]
    return event


def latest(storage, output: str) -> str:
    return json.loads(storage.read_bytes(parse_url(output).join(checkpoint.LATEST)))["checkpoint"]


def test_sigkill_mid_epoch_then_rerun_resumes_at_the_step_and_matches_the_uninterrupted_run(
    reference_run, s3_env, synthetic_dataset, run_dir, storage
):
    args = ["--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING, "--checkpoint-every", "5"]
    first = trainer(s3_env, args)
    first.wait_for_line(r"epoch 2/4 step 6/", timeout=600)
    os.kill(first.rank_pid(1), signal.SIGKILL)
    assert first.wait(120) != 0
    # Rank 0 fails at the next collective, waiting for its upload in flight on the way out.
    assert latest(storage, run_dir) == "checkpoints/epoch-0002-step-000005.pt"

    second = trainer(s3_env, args)
    wait_ok(second)
    assert resumed_event(second) == {"event": "resumed", "epoch": 2, "step": 5}
    assert [r["epoch"] for r in epochs_of(second)] == [2, 3, 4]
    assert all(r["train_samples"] == 200 for r in epochs_of(second))  # epoch 2 counts its first 5 steps too

    reference_output, reference = reference_run
    assert json.loads(second.stdout[-1])["best_val_acc"] == json.loads(reference.stdout[-1])["best_val_acc"]
    resumed, uninterrupted = final_weights(storage, run_dir, 4), final_weights(storage, reference_output, 4)
    for name, tensor in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, atol=1e-6, rtol=0, msg=name)


def test_two_ranks_interrupted_mid_epoch_go_on_with_three_each_sample_once(s3_env, synthetic_dataset, run_dir, storage):
    args = [
        "--data",
        synthetic_dataset,
        "--output",
        run_dir,
        *SMALL_TRAINING,
        "--epochs",
        "2",
        "--checkpoint-every",
        "2",
    ]
    first = trainer(s3_env, args, nproc=2)
    first.wait_for_line(r"epoch 1/2 step 5/", timeout=600)
    # Killing the writer loses an upload in flight: the one of step 4 is waited for, a later one may land too.
    first.wait_for_line(r"checkpoints/epoch-0001-step-000004\.pt saved", timeout=120)
    os.kill(first.rank_pid(0), signal.SIGKILL)
    assert first.wait(120) != 0
    stopped = checkpoint.position(latest(storage, run_dir))
    assert stopped[0] == 1 and stopped[1] >= 4, stopped

    second = trainer(s3_env, args, nproc=3)
    wait_ok(second)
    assert resumed_event(second) == {"event": "resumed", "epoch": 1, "step": stopped[1]}
    assert any("goes on with 3 ranks instead of 2" in line and "global batch is 48 instead of 32" in line
               for line in second.stderr)  # fmt: skip
    metrics = [json.loads(line) for line in storage.read_bytes(parse_url(run_dir).join("metrics.jsonl")).splitlines()]
    assert [(r["epoch"], r["train_samples"]) for r in metrics] == [(1, 200), (2, 200)]
    assert [r["train_samples"] for r in epochs_of(second)] == [200, 200]


def test_sigterm_writes_a_checkpoint_exits_143_and_the_rerun_loses_no_step(s3_env, synthetic_dataset, run_dir, storage):
    args = [sys.executable, "-m", "training", "--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING,
            "--epochs", "1", "--checkpoint-every", "0"]  # fmt: skip
    first = Watched(args, s3_env)
    first.wait_for_line(r"epoch 1/1 step 3/", timeout=300)
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.wait(120) == 143
    stopped_at = checkpoint.position(latest(storage, run_dir))
    assert stopped_at[0] == 1 and stopped_at[1] >= 3, "the checkpoint SIGTERM wrote, mid-epoch 1"

    second = Watched(args, s3_env)
    wait_ok(second)
    assert resumed_event(second) == {"event": "resumed", "epoch": 1, "step": stopped_at[1]}
    assert [(r["epoch"], r["train_samples"]) for r in epochs_of(second)] == [(1, 200)]


def test_training_goes_on_while_a_checkpoint_uploads_and_sigterm_waits_for_the_upload(minio, s3_env,
                                                                                      synthetic_dataset, run_dir,
                                                                                      storage):  # fmt: skip
    """Storage slow to take a checkpoint (its answer 10 s late): rank 0 trains on meanwhile, `latest`
    moves only once the checkpoint and its .sha256 have landed, the next checkpoint waits for it and
    says so, and SIGTERM exits 143 only once the upload in flight and its own checkpoint have landed —
    a second SIGTERM while it waits for them included (a kubelet or an impatient user sending another)."""
    out = parse_url(run_dir)
    held = checkpoint.checkpoint_name(1, 2)
    # A single PUT, or the first part of a multipart upload (a resnet18 with Adam is ~130 MB), of the
    # checkpoint of step 2 and of those from step 4 on, SIGTERM's among them.
    name = re.escape(held).replace("000002", "00000[2-9]")
    pattern = rf"PUT /{out.bucket}/{out.key}/{name}(\?partNumber=1&| )"
    proxy = FaultyProxy(minio.port, pattern.encode(), fault=("delay", 10))
    args = [sys.executable, "-m", "training", "--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING,
            "--epochs", "2", "--checkpoint-every", "2"]  # fmt: skip
    proc = Watched(args, s3_env | {"S3_ENDPOINT_URL": proxy.endpoint})
    try:
        assert proxy.matched.wait(300), "\n".join(proc.stderr[-10:])
        proc.wait_for_line(r"epoch 1/2 step 4/", timeout=60)  # two steps trained while the upload is held
        assert not storage.exists(out.join(checkpoint.sidecar(held)))
        assert not storage.exists(out.join(checkpoint.LATEST))
        os.kill(proc.proc.pid, signal.SIGTERM)
        proc.wait_for_line(r"SIGTERM: the checkpoint lands before this rank exits", timeout=60)
        os.kill(proc.proc.pid, signal.SIGTERM)  # while SIGTERM's checkpoint is held
        assert proc.wait(120) == 143, "\n".join(proc.stderr[-10:])
    finally:
        proxy.close()
    said = "\n".join(proc.stderr)
    assert said.index("epoch 1/2 step 4/") < said.index(f"{held} saved")
    assert f"{checkpoint.checkpoint_name(1, 4)} waited" in said and "for the checkpoint before it to upload" in said
    stopped = latest(storage, run_dir)
    assert checkpoint.position(stopped) >= (1, 4) and f"{stopped} saved" in said
    pointer = json.loads(storage.read_bytes(out.join(checkpoint.LATEST)))
    assert hashlib.sha256(storage.read_bytes(out.join(stopped))).hexdigest() == pointer["sha256"]
    assert json.loads(storage.read_bytes(out.join("progress.json")))["state"] == "stopped"  # not "failed"


@pytest.mark.parametrize("entry", ["python", "training.launch"])
def test_exit_codes_say_whether_a_restart_can_help(entry, s3_env, synthetic_dataset, run_dir):
    def argv(*args: str) -> list[str]:
        if entry == "training.launch":
            return launcher(2, "-m", "training", *args)
        return [sys.executable, "-m", "training", *args]

    def run(*args: str, env=s3_env) -> int:
        return Watched(argv(*args), env).wait(180)

    base = ["--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING]
    assert run(*base, "--epochs", "0") == 2
    assert run(*base, "--data", s3("datasets/absent")) == 3
    assert run(*base, env=s3_env | {"AWS_SECRET_ACCESS_KEY": "wrong-secret-123"}) == 5

    proc = Watched(argv(*base), s3_env)
    proc.wait_for_line(r"epoch 1/4 step 2/", timeout=300)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    assert run(*base, "--arch", "resnet34") == 4  # the checkpoint SIGTERM wrote is of resnet18


def test_a_bad_latest_or_checkpoint_falls_back_to_the_newest_intact_one(s3_env, synthetic_dataset, run_dir, storage):
    out = parse_url(run_dir)
    args = ["--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING, "--checkpoint-every", "3"]
    wait_ok(trainer(s3_env, [*args, "--epochs", "1"]))
    kept = sorted(checkpoint.kept_checkpoints(storage, out), key=checkpoint.position)
    assert kept == ["checkpoints/epoch-0001-step-000003.pt", "checkpoints/epoch-0001-step-000006.pt",
                    "checkpoints/epoch-0001.pt"]  # fmt: skip

    # The newest checkpoint torn: the one before it is used (and the epoch's last step trained again).
    newest = storage.read_bytes(out.join(kept[-1]))
    storage.write_bytes(out.join(kept[-1]), newest[: len(newest) // 2])
    torn = trainer(s3_env, [*args, "--epochs", "1"])
    wait_ok(torn)
    assert resumed_event(torn) == {"event": "resumed", "epoch": 1, "step": 6}
    assert any("resuming from the newest intact checkpoint, checkpoints/epoch-0001-step-000006.pt" in line
               for line in torn.stderr)  # fmt: skip

    # `latest` unreadable: the newest kept checkpoint whose .sha256 matches is used. The same run is
    # a compatible change of options, said and kept.
    storage.write_bytes(out.join(checkpoint.LATEST), b"{not json")
    garbled = trainer(s3_env, [*args, "--epochs", "2", "--lr", "0.002"])
    wait_ok(garbled)
    assert resumed_event(garbled) == {"event": "resumed", "epoch": 2, "step": 0}
    assert any("is unreadable" in line for line in garbled.stderr)
    assert [r["epoch"] for r in epochs_of(garbled)] == [2]
    said = "\n".join(garbled.stderr)
    assert "--epochs changed from 1 to 2 on resume: the learning-rate schedule is recomputed" in said
    assert "--lr changed from 0.001 to 0.002" in said
    saved = checkpoint.deserialize(storage.read_bytes(out.join(checkpoint.checkpoint_name(2))))
    assert {"scaler", "config", "classes", "stretches", "train_sums"} <= set(saved)
    assert saved["config"]["lr"] == 0.002 and saved["config"]["epochs"] == 2

    # An incompatible change is refused with every difference named.
    refused = Watched([sys.executable, "-m", "training", *args, "--arch", "resnet34", "--optimizer", "sgd"], s3_env)
    assert refused.wait(120) == 4
    assert "--arch resnet34 (the checkpoint: resnet18); --optimizer sgd (the checkpoint: adam)" in refused.stderr[-1]


def test_every_rank_resumes_from_rank_zeros_choice(minio, s3_env, synthetic_dataset, run_dir, storage, tmp_path):
    """Rank 1 here may not even read `latest` (a MinIO policy denies it): it must take rank 0's word
    for where to resume, as a replacement worker must, whatever it would have found itself."""
    args = ["--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING]
    wait_ok(trainer(s3_env, [*args, "--epochs", "1"]))

    out = parse_url(run_dir)
    root = StaticProvider(s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"])
    admin = MinioAdmin(endpoint=s3_env["S3_ENDPOINT_URL"].split("://")[1], secure=False, credentials=root)
    bucket = f"arn:aws:s3:::{out.bucket}"
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:*"], "Resource": [bucket, f"{bucket}/*"]},
        {"Effect": "Deny", "Action": ["s3:GetObject"], "Resource": [f"{bucket}/{out.key}/latest"]},
    ]}  # fmt: skip
    user, secret = f"worker-{os.getpid()}", "worker-secret-123456"
    admin.policy_add(user, policy=policy)
    admin.user_add(user, secret)
    admin.attach_policy([user], user=user)
    try:
        denied = {"AWS_ACCESS_KEY_ID": user, "AWS_SECRET_ACCESS_KEY": secret}
        ranks = pods(s3_env, [*args, "--epochs", "2"], [{}, denied], tmp_path)
        for proc in ranks:
            wait_ok(proc, timeout=600)
    finally:
        admin.user_remove(user)
        admin.policy_remove(user)
    assert resumed_event(ranks[0]) == {"event": "resumed", "epoch": 2, "step": 0}
    assert [r["epoch"] for r in epochs_of(ranks[0])] == [2]
    assert any(path.suffix == ".pt" for path in (tmp_path / "pod1" / "checkpoints").rglob("*"))


def test_an_outage_while_rank_zero_chooses_the_checkpoint_is_retried_everywhere(minio, s3_env, synthetic_dataset,
                                                                                  run_dir, tmp_path):  # fmt: skip
    """Reading `latest` answers 503 for as long as storage calls are retried: every rank's pod exits 201
    (an outage, retried by restartPolicy ExitCode), not 5 (a refusal, final) — rank 0's failure keeps its
    kind. One process per pod: under torchrun the first rank to exit has the others stopped (143)."""
    out = parse_url(run_dir)
    proxy = FaultyProxy(minio.port, rf"GET /{out.bucket}/{out.key}/latest ".encode(), fault="503")
    env = s3_env | {"S3_ENDPOINT_URL": proxy.endpoint, "PETAL_S3_RETRY_SECONDS": "2"}
    ranks = pods(env, ["--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING], [{}, {}], tmp_path)
    try:
        for proc in ranks:
            assert proc.wait(180) == 201, "\n".join(proc.stderr[-10:])
    finally:
        proxy.close()
        for proc in ranks:  # a rank left waiting on a failed peer goes too
            proc.kill()
    assert proxy.hits > 1  # retried, then given up
    for proc in ranks:
        assert any("still failing after 2s of retries (exit 201)" in line for line in proc.stderr), proc.stderr[-5:]


def test_sigterm_in_the_last_steps_of_an_uneven_epoch_stops_within_a_step(s3_env, synthetic_dataset, run_dir, storage):
    """100 samples over 3 ranks at batch size 1: 34, 33 and 33 steps. SIGTERM during step 33 — where two
    ranks have no sample left — still stops every rank within a step, at a step checkpoint; it does not
    train on, evaluate and write the epoch's checkpoint first."""
    args = ["--data", synthetic_dataset, "--output", run_dir, "--train-splits", "valid", *SMALL_TRAINING,
            "--epochs", "1", "--batch-size", "1", "--image-size", "64", "--checkpoint-every", "0"]  # fmt: skip
    proc = trainer(s3_env, args, nproc=3)
    proc.wait_for_line(r"epoch 1/1 step 33/34", timeout=600)
    proc.proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
    assert proc.wait(120) == 143, "\n".join(proc.stderr[-10:])
    stopped = latest(storage, run_dir)
    assert stopped in ("checkpoints/epoch-0001-step-000033.pt", "checkpoints/epoch-0001-step-000034.pt"), stopped
    assert not storage.exists(parse_url(run_dir).join("metrics.jsonl"))  # the epoch was not evaluated


def test_the_launcher_gives_its_ranks_the_pods_grace_period_to_save(minio, s3_env, synthetic_dataset, run_dir,
                                                                     storage):  # fmt: skip
    """Under training.launch (torchrun: every TrainJob pod, nprocPerNode > 1) a checkpoint that takes
    40 s to upload still lands after SIGTERM: the launcher waits as long as the pod's grace period
    allows (PETAL_TERMINATION_GRACE_SECONDS, less a margin), not torchrun's 30 s."""
    out = parse_url(run_dir)
    # A single PUT, or the first part of a multipart upload (a resnet18 with Adam is ~130 MB).
    pattern = rf"PUT /{out.bucket}/{out.key}/checkpoints/epoch-0001-step-\d+\.pt(\?partNumber=1&| )"
    proxy = FaultyProxy(minio.port, pattern.encode(), fault=("delay", 40))
    env = s3_env | {"S3_ENDPOINT_URL": proxy.endpoint, "PETAL_TERMINATION_GRACE_SECONDS": "90"}
    proc = Watched(launcher(2, "-m", "training", "--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING,
                            "--checkpoint-every", "0"), env)  # fmt: skip
    try:
        proc.wait_for_line(r"epoch 1/4 step 2/", timeout=300)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(150) == 143, "\n".join(proc.stderr[-10:])
    finally:
        proxy.close()
    assert proxy.hits == 1, "\n".join(proc.stderr[-10:])
    assert latest(storage, run_dir).startswith("checkpoints/epoch-0001-step-")
