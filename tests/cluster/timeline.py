"""Where a cluster test's time goes, measured from the pods themselves: a watch on every pod of the
test bed records when each was created, scheduled and started, when each instance of its main
container ran and ended, and — from the container's own log, streamed as it is written — when the
trainer was ready to train (its "process(es)" line) and what its start-up cost (its "ready in" line).

Each test's wall time is then split into phases along its rank-0 pods (the master, or a TrainJob's
node 0; for plain pods, every pod), the most advanced phase winning where pods overlap:

    scheduling       pod created → scheduled
    pod start        scheduled → container started (sandbox, the operator's init container)
    trainer start    container started → ready to train (Python, torch, rendezvous, dataset, model)
    training         ready → container ended (for a pod that is not the trainer: running)
    restart          a container ended → the next instance of its rank started (backoffs, recreation)
    outside pods     the rest: rendering and submitting, host-side work, waiting after the job, teardown
    test CPU         CPU seconds the test's own child processes used (kubectl, helm, petal, host torchrun)

`scripts/test.sh` prints the table at the end of a run that used the cluster (the test bed's docs
hold a measured one).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

PHASES = ("scheduling", "pod start", "trainer start", "training", "restart")
READY = re.compile(r"petal: \d+ process\(es\)")
STARTUP = re.compile(r"petal: ready in ([\d.]+) s \((.*)\)")
RANK_ZERO = (
    ("training.kubeflow.org/replica-type", "master"),
    ("batch.kubernetes.io/job-completion-index", "0"),
)


@dataclass
class Instance:
    """One run of a pod's main container."""

    started: float
    ended: float | None = None
    ready: float | None = None
    exit_code: int | None = None
    startup: dict[str, float] = field(default_factory=dict)


@dataclass
class PodRecord:
    namespace: str
    name: str
    chain: str  # pods that stand for the same rank across recreations share it
    rank_zero: bool
    created: float
    scheduled: float | None = None
    gone: float | None = None
    instances: dict[int, Instance] = field(default_factory=dict)

    def end(self) -> float | None:
        """When its last container instance ended, or it was deleted."""
        runs = [run.ended for run in self.instances.values() if run.ended is not None]
        return max(runs, default=None) or self.gone

    def intervals(self) -> list[tuple[float, float, str]]:
        spans = []
        runs = [self.instances[k] for k in sorted(self.instances)]
        first_start = runs[0].started if runs else self.gone
        if self.scheduled is not None:
            spans.append((self.created, self.scheduled, "scheduling"))
            if first_start is not None:
                spans.append((self.scheduled, first_start, "pod start"))
        for run, following in zip(runs, [*runs[1:], None], strict=True):
            end = run.ended or self.gone or time.time()
            if run.ready is not None:
                spans += [(run.started, run.ready, "trainer start"), (run.ready, end, "training")]
            else:
                spans.append((run.started, end, "training"))
            if following is not None:
                spans.append((end, following.started, "restart"))
        return [(a, b, phase) for a, b, phase in spans if b > a]


def _seconds(stamp) -> float | None:
    return stamp.timestamp() if stamp is not None else None


class Timeline:
    """Watches the test bed's pods in a background thread for the whole session."""

    def __init__(self, kubeconfig: str):
        from kubernetes import client, config

        self.api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
        self.pods: dict[str, PodRecord] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.streams: set[tuple[str, int]] = set()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        while not self.stopped.is_set():
            try:
                for event in watch.Watch().stream(self.api.list_pod_for_all_namespaces, timeout_seconds=60):
                    self._seen(event["type"], event["object"])
                    if self.stopped.is_set():
                        return
            except (ApiException, OSError, ValueError):  # a watch cut short (410 Gone, a restart): watch again
                self.stopped.wait(0.5)

    def _seen(self, kind: str, pod) -> None:
        meta, status = pod.metadata, pod.status
        labels = meta.labels or {}
        with self.lock:
            record = self.pods.get(meta.uid)
            if record is None:
                job = labels.get("training.kubeflow.org/job-name") or labels.get("jobset.sigs.k8s.io/jobset-name")
                rank = next((f"{key}={value}" for key, value in RANK_ZERO if labels.get(key) == value), None)
                chain = f"{meta.namespace}/{job}/{rank}" if job and rank else f"{meta.namespace}/{meta.name}"
                record = self.pods[meta.uid] = PodRecord(meta.namespace, meta.name, chain, bool(rank) or not job,
                                                         _seconds(meta.creation_timestamp))  # fmt: skip
            for condition in status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "True":
                    record.scheduled = _seconds(condition.last_transition_time)
            main = [s for s in status.container_statuses or [] if s.name in ("pytorch", "node", "main")]
            main = main or (status.container_statuses or [])[:1]
            for container in main:
                for state in (container.last_state, container.state):
                    count = container.restart_count - (state is container.last_state)
                    if state and state.running and count >= 0:
                        record.instances.setdefault(count, Instance(_seconds(state.running.started_at)))
                        self._follow(meta.namespace, meta.name, container.name, meta.uid, count)
                    if state and state.terminated and count >= 0:
                        run = record.instances.setdefault(count, Instance(_seconds(state.terminated.started_at)))
                        run.ended, run.exit_code = _seconds(state.terminated.finished_at), state.terminated.exit_code
            if kind == "DELETED" or meta.deletion_timestamp:
                record.gone = record.gone or time.time()

    def _follow(self, namespace: str, name: str, container: str, uid: str, count: int) -> None:
        """The instance's log as it is written, noting when the trainer says it is ready."""
        if (uid, count) in self.streams:
            return
        self.streams.add((uid, count))

        def stream() -> None:
            try:
                response = self.api.read_namespaced_pod_log(name, namespace, container=container, follow=True,
                                                            _preload_content=False)  # fmt: skip
                for line in response.stream():
                    text = line.decode(errors="replace")
                    with self.lock:
                        run = self.pods[uid].instances[count]
                        if run.ready is None and READY.search(text):
                            run.ready = time.time()
                        for seconds, parts in STARTUP.findall(text):
                            run.startup = {"total": float(seconds)} | {
                                key: float(value) for key, value in re.findall(r"([a-z ]+) ([\d.]+)", parts)
                            }
            except Exception:  # noqa: BLE001 — a pod gone before its log could be read: no ready time
                return

        threading.Thread(target=stream, daemon=True).start()

    def breakdown(self, start: float, end: float) -> dict[str, float]:
        """Seconds of [start, end] in each phase, along the rank-0 pods created in that window."""
        with self.lock:
            pods = sorted((p for p in self.pods.values() if p.rank_zero and start <= p.created <= end),
                          key=lambda p: p.created)  # fmt: skip
            spans = [span for pod in pods for span in pod.intervals()]
            for pod in pods:  # a pod made anew for its rank: the time from the old one's end is a restart
                before = [p for p in pods if p.chain == pod.chain and p.created < pod.created]
                if before and (ended := before[-1].end()) is not None and ended < pod.created:
                    spans.append((ended, pod.created, "restart"))
        cuts = sorted({start, end, *(t for a, b, _ in spans for t in (a, b) if start < t < end)})
        seconds = dict.fromkeys(PHASES, 0.0)
        for a, b in zip(cuts, cuts[1:], strict=False):
            active = [phase for lo, hi, phase in spans if lo <= a and hi >= b]
            if active:
                seconds[max(active, key=PHASES.index)] += b - a
        seconds["outside pods"] = (end - start) - sum(seconds.values())
        return seconds

    def startups(self, start: float, end: float) -> list[dict[str, float]]:
        """The trainer's own start-up breakdowns ("ready in" lines) of the containers started in the window."""
        with self.lock:
            return [run.startup for pod in self.pods.values() for run in pod.instances.values()
                    if run.startup and start <= run.started <= end]  # fmt: skip

    def close(self) -> None:
        self.stopped.set()


def table(rows: list[tuple[str, float, dict[str, float]]]) -> str:
    """A Markdown table: one row per test, its wall seconds and seconds per phase."""
    columns = [*PHASES, "outside pods", "test CPU"]
    lines = ["| test | wall s | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 2)]
    for name, wall, phases in sorted(rows, key=lambda row: -row[1]):
        lines.append(f"| {name} | {wall:.0f} | " + " | ".join(f"{phases[c]:.0f}" for c in columns) + " |")
    total = [sum(phases[c] for _, _, phases in rows) for c in columns]
    lines.append(f"| all | {sum(wall for _, wall, _ in rows):.0f} | " + " | ".join(f"{t:.0f}" for t in total) + " |")
    return "\n".join(lines)
