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

`scripts/test.sh` prints the table at the end of a run that used the cluster (tests/conftest.py, from
every pytest-xdist worker's TIMINGS; the test bed's docs hold a measured one).

The same watch is what tests wait on: `wait_for` re-checks a condition at each pod event or log line
(no polling, no kubectl per check), and every container instance's log is kept, a deleted pod's too.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

PHASES = ("scheduling", "pod start", "trainer start", "training", "restart")
# This process's measurements: (test, wall seconds, seconds by phase), and the trainers' start-ups.
TIMINGS: list[tuple[str, float, dict[str, float]]] = []
STARTUPS: list[dict[str, float]] = []
READY = re.compile(r"petal: \d+ process\(es\)")
STARTUP = re.compile(r"petal: ready in ([\d.]+) s \((.*)\)")
RANK_ZERO = (
    ("training.kubeflow.org/replica-type", "master"),
    ("batch.kubernetes.io/job-completion-index", "0"),
)


@dataclass
class Instance:
    """One run of a pod's main container, and its log."""

    started: float
    ended: float | None = None
    ready: float | None = None
    exit_code: int | None = None
    startup: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


@dataclass
class PodRecord:
    uid: str
    namespace: str
    name: str
    chain: str  # pods that stand for the same rank across recreations share it
    job: str | None  # the Kubeflow job it runs for
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
        runs = [self.instances[k] for k in sorted(self.instances) if self.instances[k].started is not None]
        first_start = runs[0].started if runs else self.gone
        if self.scheduled is not None:
            spans.append((self.created, self.scheduled, "scheduling"))
            if first_start is not None:
                spans.append((self.scheduled, first_start, "pod start"))
        for i, run in enumerate(runs):
            following = runs[i + 1] if i + 1 < len(runs) else None
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
        self.lock = threading.RLock()  # a probe (under wait_for) may call the readers below, which take it too
        self.changed = threading.Condition(self.lock)  # notified at every pod event and log line
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
                created = _seconds(meta.creation_timestamp)
                record = PodRecord(meta.uid, meta.namespace, meta.name, chain, job, bool(rank) or not job, created)
                self.pods[meta.uid] = record
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
            self.changed.notify_all()

    def _follow(self, namespace: str, name: str, container: str, uid: str, count: int) -> None:
        """The instance's log as it is written, noting when the trainer says it is ready."""
        if (uid, count) in self.streams:
            return
        self.streams.add((uid, count))

        def stream() -> None:
            try:
                response = self.api.read_namespaced_pod_log(name, namespace, container=container, follow=True,
                                                            _preload_content=False)  # fmt: skip
                pending = b""
                for chunk in response.stream():
                    *complete, pending = (pending + chunk).split(b"\n")
                    with self.lock:
                        self._logged(self.pods[uid].instances[count], [c.decode(errors="replace") for c in complete])
                with self.lock:
                    self._logged(self.pods[uid].instances[count], [pending.decode(errors="replace")] if pending else [])
            except Exception:  # noqa: BLE001 — a pod gone before its log could be read: no ready time
                return

        threading.Thread(target=stream, daemon=True).start()

    def _logged(self, run: Instance, lines: list[str]) -> None:
        for text in lines:
            run.lines.append(text)
            if run.ready is None and READY.search(text):
                run.ready = time.time()
            for seconds, parts in STARTUP.findall(text):
                run.startup = {"total": float(seconds)} | {
                    key: float(value) for key, value in re.findall(r"([a-z ]+) ([\d.]+)", parts)
                }
        self.changed.notify_all()

    def wait_for(self, what: str, probe, timeout: float):
        """probe()'s first truthy answer, asked again at every pod event and log line (AssertionError
        naming `what` after `timeout` seconds). probe runs under the lock: it reads, never waits."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not (found := probe()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"still waiting for {what} after {timeout:.0f}s")
                self.changed.wait(min(left, 5))  # and every 5 s: a probe may look at the clock
            return found

    def named(self, namespace: str, name: str) -> list[PodRecord]:
        """Every pod that had this name, oldest first (a pod made anew for a rank keeps its name)."""
        with self.lock:
            return sorted((p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name)),
                          key=lambda p: p.created)  # fmt: skip

    def runs(self, namespace: str, name: str) -> list[tuple[PodRecord, Instance]]:
        """Every container instance of the pods of that name, in the order they started."""
        with self.lock:
            return [(pod, pod.instances[k]) for pod in self.named(namespace, name) for k in sorted(pod.instances)]

    def job_runs(self, namespace: str, job: str, rank_zero: bool = False) -> list[tuple[PodRecord, Instance]]:
        """Every container instance of a job's pods (with rank_zero, of its master or node 0 only: pods
        JobSet makes anew under new names), in the order they started."""
        with self.lock:
            pods = [p for p in self.pods.values() if (p.namespace, p.job) == (namespace, job)]
            pods = [p for p in pods if p.rank_zero or not rank_zero]
            return sorted(((p, run) for p in pods for run in p.instances.values()), key=lambda r: r[1].started)

    def log(self, namespace: str, name: str) -> list[str]:
        """The log of the newest instance of the newest pod of that name ([] while there is none)."""
        with self.lock:
            runs = self.runs(namespace, name)
            return list(runs[-1][1].lines) if runs else []

    def breakdown(self, start: float, end: float) -> dict[str, float]:
        """Seconds of [start, end] in each phase, along the rank-0 pods created in that window."""
        with self.lock:
            pods = sorted((p for p in self.pods.values() if p.rank_zero and p.created and start <= p.created <= end),
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
                    if run.startup and run.started is not None and start <= run.started <= end]  # fmt: skip

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


def summary() -> list[str]:
    """The end-of-run report: the table, and the trainers' mean start-up by part."""
    if not TIMINGS:
        return []
    lines = [table(TIMINGS)]
    if STARTUPS:
        parts = sorted({key for startup in STARTUPS for key in startup})
        means = ", ".join(f"{key} {sum(s.get(key, 0) for s in STARTUPS) / len(STARTUPS):.1f}" for key in parts)
        lines.append(f"trainer start-up, mean of {len(STARTUPS)} containers (s): {means}")
    return lines
