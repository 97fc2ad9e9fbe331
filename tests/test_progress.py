"""What rank 0 says about a run (training/progress.py, on tracking.py's Background sender): a slow or
failing upload never holds the training loop and never ends the run, and every way out leaves
progress.json in the run's real final state with every TensorBoard scalar uploaded."""

from __future__ import annotations

import json
import threading

import pytest
from support import FaultyProxy, s3

from training.progress import Progress
from training.storage import Storage, StorageError, parse_url
from training.tracking import Background


def test_a_slow_send_never_holds_the_caller_and_what_arrives_meanwhile_goes_next_merged():
    started, release, sent = threading.Event(), threading.Event(), []

    def send(work):
        sent.append(work)
        started.set()
        release.wait(60)

    sender = Background("test", send, merge=lambda older, newer: older + newer)
    sender.submit([1])
    assert started.wait(60)
    for n in (2, 3, 4):
        sender.submit([n])  # returns at once, with [1] still being sent
    release.set()
    sender.close(60)
    assert sent == [[1], [2, 3, 4]]


def test_a_failing_send_is_said_once_kept_and_sent_with_the_next_work_and_at_close(capsys):
    """Whatever it raised: an unforeseen error (last, here) is said and outlived like storage down."""
    failures, sent = [ValueError("a record it cannot take"), StorageError("storage down"),
                      StorageError("storage down")], []  # fmt: skip
    tried = threading.Semaphore(0)

    def send(work):
        try:
            if failures:
                raise failures.pop()
            sent.append(work)
        finally:
            tried.release()

    sender = Background("test upload", send, merge=lambda older, newer: older + newer)
    for work in ("a", "b", "c"):
        sender.submit([work])
        assert tried.acquire(timeout=60)
    sender.submit(["d"])
    sender.close(60)
    assert sent == [["a", "b", "c", "d"]]
    said = capsys.readouterr().err
    assert said.count("petal: test upload failed (StorageError: storage down); training goes on") == 1, said
    assert said.count("petal: test upload failed (ValueError: a record it cannot take); training goes on") == 1


def test_closing_while_a_send_fails_still_tries_once_with_what_came_after_it():
    """The run's last record arrives while an older one is failing (storage coming back, say): closing
    tries it once more, merged, instead of ending with the failure and losing the last word."""
    tried, started = [], threading.Event()

    def send(work):
        tried.append(work)
        started.set()
        if len(tried) == 1:
            with sender.changed:
                assert sender.changed.wait_for(lambda: sender.closing, timeout=60)
            raise StorageError("storage down")

    sender = Background("test upload", send, merge=lambda older, newer: older + newer)
    sender.submit(["older"])
    assert started.wait(60)
    sender.submit(["last"])  # while "older" is under way
    sender.close(60)
    assert tried == [["older"], ["older", "last"]]


@pytest.mark.parametrize("outcome", ["stopped", "failed", "done"])
def test_progress_rides_out_storage_down_and_ends_in_the_runs_final_state(outcome, minio, storage, tmp_path):
    """Storage down while the loop reports steps: every call returns (a send inline would hang for its
    retries, then raise); once storage is back, closing leaves progress.json saying how the run ended
    and every logged scalar in the uploaded TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proxy = FaultyProxy(minio.port)
    env = minio.env
    through_proxy = Storage(proxy.endpoint, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], retry_seconds=5)
    output = parse_url(s3(f"runs/progress-{outcome}"))
    progress = Progress(through_proxy, output, epochs=2, global_batch=8, events_dir=tmp_path / "events")
    proxy.down()
    try:
        for step in range(1, 21):
            progress.step(1, step, 20, loss=1.0 / step, best_val_acc=-1.0, global_step=step)
    finally:
        proxy.up()
    progress.close(outcome)
    proxy.close()

    record = json.loads(storage.read_bytes(output.join("progress.json")))
    assert record["state"] == outcome and record["step"] == 20 and record["loss"] == pytest.approx(1 / 20)
    (events_dir := tmp_path / "downloaded").mkdir()
    for name in storage.list(output.join("tensorboard")):
        storage.download(name, events_dir / name.key.rsplit("/", 1)[1])
    events = EventAccumulator(str(events_dir))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 21))
