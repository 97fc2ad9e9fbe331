"""petal's jobs once submitted: what they are doing (list, status: the Kubernetes object, its pods, the
progress record the trainer writes into its run directory and, for a TrainJob whose Trainer has the
TrainJobStatus gate on, the status.trainerStatus it reports), their logs, cancelling them and
collecting their results. No torch here.

    petal list [-A] [--json]
    petal status NAME [--json] [--watch]
    petal logs NAME [-f] [--rank N]
    petal cancel NAME
    petal collect NAME [DIR]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from petal.cluster import QUEUE_LABEL, BadArguments, Cluster, JobFailed, NotCollected, Precondition, age_seconds
from petal.kinds import kind_of
from petal.pods import follow_log
from training import artifacts
from training.shards import DatasetError
from training.storage import Storage, StorageError, parse_url

RUNS = Path("runs")  # in the working directory, as every message says: never in the installed package
SYNC_SECONDS = 30


def job_output(job: dict) -> str:
    output = kind_of(job).output(job)
    if output is None:
        raise BadArguments(f"{job['kind']} {job['metadata']['name']} gives its trainer neither --output nor "
                           "PETAL_OUTPUT: it is not a petal run")  # fmt: skip
    return output


def state(job: dict) -> str:
    return kind_of(job).state(job)


def age(job: dict) -> str:
    return duration(age_seconds(job))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def storage_or_none() -> Storage | None:
    """Storage as this shell is configured for it, or None where it is not (progress then shows '-')."""
    try:
        return Storage.from_env()
    except StorageError:
        return None


def read_json(storage: Storage | None, url: str) -> dict | list | None:
    if storage is None:
        return None
    try:
        text = storage.read_bytes(parse_url(url)).decode()
    except StorageError:
        return None
    return [json.loads(line) for line in text.splitlines()] if url.endswith(".jsonl") else json.loads(text)


def reported_status(job: dict) -> dict | None:
    """A TrainJob's status.trainerStatus (what the trainer reported through Kubeflow Trainer's status
    server: training/tracking.py) as {"percent", "eta_seconds", "metrics": {name: number}}; None
    without one."""
    reported = (job.get("status") or {}).get("trainerStatus")
    if not reported:
        return None
    metrics = {}
    for metric in reported.get("metrics") or []:
        try:
            metrics[metric["name"]] = float(metric["value"])
        except (KeyError, TypeError, ValueError):
            continue  # another writer's metric that is not a number: not ours to show
    return {"percent": reported.get("progressPercentage"), "eta_seconds": reported.get("estimatedRemainingSeconds"),
            "metrics": metrics}  # fmt: skip


def describe(cluster: Cluster, job: dict, storage: Storage | None, in_full: bool) -> dict:
    """What `list` says of a job (its object and progress record, else its TrainJob status), and in full
    what `status` says: its pods, Kueue's reason and the epochs' history too."""
    output = job_output(job)
    progress = read_json(storage, f"{output}/progress.json") or {}
    history = (read_json(storage, f"{output}/metrics.jsonl") or []) if in_full else []
    finished = state(job) in ("Succeeded", "Failed")
    reported = reported_status(job)
    reported_metrics = reported["metrics"] if reported else {}
    described = {
        "name": job["metadata"]["name"],
        "namespace": job["metadata"]["namespace"],
        "kind": job["kind"],
        "state": state(job),
        "age": age(job),
        "output": output,
        "epoch": progress.get("epoch"),
        "epochs": progress.get("epochs"),
        "step": progress.get("step"),
        "steps": progress.get("steps"),
        "loss": progress.get("loss", reported_metrics.get("train/loss")),
        "images_per_s": progress.get("images_per_s", reported_metrics.get("train/images_per_s")),
        "eta_seconds": None if finished else progress.get("eta_seconds", reported and reported["eta_seconds"]),
        "best_val_acc": max(
            (r["val_acc"] for r in history),
            default=progress.get("best_val_acc", reported_metrics.get("val/best_accuracy")),
        ),
        "progress_updated": progress.get("updated"),
        "trainer_status": reported,
        "conditions": [
            {k: c.get(k) for k in ("type", "status", "reason", "message")}
            for c in job.get("status", {}).get("conditions", [])
        ],  # fmt: skip
        "last_epoch": {k: v for k, v in history[-1].items() if k != "val_per_class_acc"} if history else None,
    }
    if in_full:
        queued = described["state"] == "Queued" and job["metadata"]["labels"].get(QUEUE_LABEL)
        described["admission"] = cluster.admission(job) if queued else None
        described["pods"] = [
            {"name": p.metadata.name, "phase": p.status.phase,
             "restarts": sum(s.restart_count for s in p.status.container_statuses or []),
             "unscheduled": unscheduled(p)}
            for p in cluster.pods(job)
        ]  # fmt: skip
    return described


def unscheduled(pod) -> str | None:
    """Why the scheduler has not placed the pod (its PodScheduled condition's message), while it has not."""
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return condition.message or condition.reason
    return None


def progress_text(d: dict) -> str:
    percent = (
        f"{d['trainer_status']['percent']}%"
        if d["trainer_status"] and d["trainer_status"]["percent"] is not None
        else None
    )
    if d["epoch"] is None:
        return percent or "-"
    step = f" step {d['step']}/{d['steps']}" if d["step"] is not None and d["state"] not in ("Succeeded",) else ""
    return f"epoch {d['epoch']}/{d['epochs']}{step}" + (f" ({percent})" if percent else "")


def list_jobs(cluster: Cluster, all_namespaces: bool, as_json: bool) -> int:
    storage = storage_or_none()
    described = [describe(cluster, job, storage, in_full=False) for job in cluster.jobs(all_namespaces)]
    if as_json:
        print(json.dumps(described, indent=1))
        return 0
    header = ["NAMESPACE"] if all_namespaces else []
    rows = [[*header, "NAME", "KIND", "STATE", "PROGRESS", "BEST VAL ACC", "AGE", "ETA"]]
    for d in described:
        best = f"{d['best_val_acc']:.4f}" if d["best_val_acc"] is not None else "-"
        rows.append([*([d["namespace"]] if all_namespaces else []), d["name"], d["kind"], d["state"], progress_text(d),
                     best, d["age"], duration(d["eta_seconds"])])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def status(cluster: Cluster, name: str, as_json: bool, watch: bool) -> int:
    storage = storage_or_none()
    while True:
        d = describe(cluster, cluster.job(name), storage, in_full=True)
        if as_json:
            print(json.dumps(d, indent=1), flush=True)
        else:
            if watch:
                print("\033[2J\033[H", end="")  # redraw in place
            print(status_text(d), flush=True)
        if not watch or d["state"] in ("Succeeded", "Failed"):
            return 0
        time.sleep(5)


def status_text(d: dict) -> str:
    lines = [f"{d['kind']} {d['namespace']}/{d['name']}: {d['state']} (age {d['age']})", f"output: {d['output']}"]
    if d["admission"]:
        lines.append(f"waiting for Kueue admission: {d['admission']}")
    if d["epoch"] is not None or d["trainer_status"]:
        rate = f", {d['images_per_s']} img/s" if d["images_per_s"] else ""
        loss = f", loss {d['loss']:.4f}" if d["loss"] is not None else ""
        lines.append(f"progress: {progress_text(d)}{loss}{rate}, ETA {duration(d['eta_seconds'])}")
    if d["trainer_status"] and d["trainer_status"]["metrics"]:
        metrics = ", ".join(f"{name} {value:g}" for name, value in d["trainer_status"]["metrics"].items())
        lines.append(f"TrainJob status: {metrics}")
    if d["best_val_acc"] is not None:
        lines.append(f"best validation accuracy: {d['best_val_acc']:.4f}")
    if d["last_epoch"]:
        e = d["last_epoch"]
        lines.append(f"last epoch: {e['epoch']}: train loss {e['train_loss']:.4f}, val acc {e['val_acc']:.4f}, "
                     f"{e['train_samples']} samples in {e['seconds']:.0f}s")  # fmt: skip
    lines.append("pods: " + (", ".join(f"{p['name']} {p['phase']} ({p['restarts']} restarts)" for p in d["pods"])
                             or "none"))  # fmt: skip
    lines += [f"  {p['name']} not scheduled: {p['unscheduled']}" for p in d["pods"] if p["unscheduled"]]
    lines += [f"  {c['type']}: {c['message'] or c['reason'] or ''}".rstrip() for c in d["conditions"]]
    return "\n".join(lines)


def logs(cluster: Cluster, name: str, follow: bool, rank: int) -> int:
    """The log of pod `rank` (0: the master, or node 0), following it across restarts if asked."""
    job = cluster.job(name)
    kind = kind_of(job)
    if not 0 <= rank < kind.ranks(job):
        raise BadArguments(f"--rank {rank}: {name} has ranks 0 to {kind.ranks(job) - 1} ({kind.rank_names})")
    if not follow:
        pod = cluster.rank_pod(job, rank)
        if pod is None:
            raise JobFailed(f"{name} has no pod of rank {rank} (state {state(job)})")
        try:
            sys.stdout.write(cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace,
                                                                  container=kind.container))  # fmt: skip
        except cluster.client.exceptions.ApiException as err:
            raise JobFailed(f"no log for {pod.metadata.name} ({err.reason})") from None
        return 0

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    follow_log(cluster, job, rank, write, lambda: state(cluster.job(name)) in ("Succeeded", "Failed"))
    return 0


def cancel(cluster: Cluster, name: str) -> int:
    job = cluster.job(name)
    gone = cluster.delete(job)
    print(f"petal: deleted {', '.join(gone)} in {cluster.namespace}; its outputs stay in {job_output(job)} "
          f"(petal collect {name} fetches them while the job is listed; afterwards: "
          f"python scripts/collect_run.py {job_output(job)} runs/{name})", file=sys.stderr)  # fmt: skip
    return 0


def collect(job: dict, dest: Path) -> dict:
    """The run's artifacts and TensorBoard events into dest, with a summary.json."""
    storage, output = Storage.from_env(), parse_url(job_output(job))
    collected = artifacts.collect(storage, output, dest)
    events = artifacts.collect_events(storage, output, dest / "tensorboard")
    records = [json.loads(line) for line in (dest / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["val_acc"])
    summary = {
        "job": job["metadata"]["name"],
        "namespace": job["metadata"]["namespace"],
        "output": str(output),
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "epochs": len(records),
        "conditions": [c["type"] for c in job.get("status", {}).get("conditions", [])],
        "artifacts": sorted(p.name for p in collected),
        "tensorboard_files": len(events),
    }
    (dest / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def collect_job(cluster: Cluster, name: str, dest: Path | None) -> dict:
    """`petal collect`, and submit's last step: a finished job's results, or NotCollected saying how to retry."""
    job = cluster.job(name)
    if state(job) != "Succeeded":
        raise JobFailed(f"{name} is {state(job)}, not Succeeded: nothing final to collect")
    dest = dest or RUNS / name
    try:
        return collect(job, dest)
    except (StorageError, DatasetError, OSError, ValueError, KeyError) as err:  # its work is safe in storage anyway
        raise NotCollected(f"{name} succeeded but its results could not be collected ({err}); they are in "
                           f"{job_output(job)}: petal collect {name} {dest}") from None  # fmt: skip


def tensorboard(cluster: Cluster, name: str, port: int) -> int:
    """TensorBoard on a run's event files, copied into runs/NAME/tensorboard every SYNC_SECONDS while it
    runs. (TensorBoard reads s3:// only through TensorFlow's file systems, which petal does not
    install: without TensorFlow, `tensorboard --logdir s3://…` finds nothing.)"""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("tensorboard") is None:
        raise Precondition("TensorBoard is not installed here: pip install tensorboard")
    output, dest = parse_url(job_output(cluster.job(name))), RUNS / name / "tensorboard"
    storage = Storage.from_env()
    artifacts.collect_events(storage, output, dest)
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(dest.parent),
                               "--port", str(port), "--bind_all"])  # fmt: skip
    print(f"petal: TensorBoard on {output}/tensorboard at http://localhost:{port} (Ctrl-C stops it)", file=sys.stderr)
    try:
        while server.poll() is None:
            time.sleep(SYNC_SECONDS)
            artifacts.collect_events(storage, output, dest)
    finally:
        server.terminate()
    return server.wait()
