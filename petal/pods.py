"""What a job's pods are doing, for the verbs that wait on them or explain them: why they are
Pending, their logs across restarts, and why they failed."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from petal.cluster import PENDING_GRACE_SECONDS, QUEUE_LABEL, Cluster
from petal.kinds import kind_of


class PendingReporter:
    """Says why a job waits: Kueue not admitting it (its Workload's reason), or pods staying Pending
    (the scheduler's reasons from their events at once, the kubelet's after PENDING_GRACE_SECONDS).
    Each reason once."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.said: set[str] = set()

    def say(self, line: str) -> None:
        if line not in self.said:
            self.said.add(line)
            print(f"petal: {line}", file=sys.stderr)

    def __call__(self, job: dict) -> None:
        now = time.time()
        if job["metadata"]["labels"].get(QUEUE_LABEL) and kind_of(job).suspended(job):
            reason = self.cluster.admission(job)
            if reason:
                self.say(f"{job['metadata']['name']} waiting for Kueue admission: {reason}")
            return
        for pod in self.cluster.pods(job):
            created = pod.metadata.creation_timestamp.timestamp()
            if pod.status.phase != "Pending":
                continue
            # The scheduler's refusal is said at once; other warnings (a slow image pull, say) after a grace.
            for reason in pod_event_lines(self.cluster, pod.metadata.name, warnings_only=True):
                if reason.startswith("FailedScheduling:") or now - created >= PENDING_GRACE_SECONDS:
                    self.say(f"{pod.metadata.name} Pending for {now - created:.0f}s: {reason}")


def pod_event_lines(cluster: Cluster, pod: str, warnings_only: bool = False) -> list[str]:
    events = cluster.core.list_namespaced_event(cluster.namespace, field_selector=f"involvedObject.name={pod}").items
    return [f"{e.reason}: {e.message}" for e in events if not warnings_only or e.type == "Warning"]


def follow_log(cluster: Cluster, job: dict, rank: int, write: Callable[[str], None], done: Callable[[], bool]) -> None:
    """Streams the training container's log of a rank's pod through `write` once it runs, and again
    for every new instance of it — a container restarted in place, or a pod made anew for the rank
    (under the same name or another) — until `done()` says the job is over and the last instance's
    log has ended."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    container = kind_of(job).container
    streamed = None  # (pod uid, restart count) of the instance last streamed
    while True:
        try:
            found = cluster.rank_pod(job, rank)
            statuses = [s for s in (found.status.container_statuses if found else None) or [] if s.name == container]
            instance = (found.metadata.uid, statuses[0].restart_count) if statuses else None
            started = statuses and (statuses[0].state.running or statuses[0].state.terminated)
            if started and instance != streamed:
                streamed = instance
                response = cluster.core.read_namespaced_pod_log(found.metadata.name, cluster.namespace,
                                                                container=container, follow=True,
                                                                _preload_content=False)  # fmt: skip
                for line in response.stream():
                    write(line.decode(errors="replace"))
                continue
        except (ApiException, HTTPError) as err:
            # Not created (yet, or again), or the kubelet cannot serve logs: keep polling.
            if getattr(err, "status", None) != 404:
                reason = getattr(err, "reason", None) or type(err).__name__
                print(f"petal: cannot follow rank {rank} of {job['metadata']['name']} yet ({reason})", file=sys.stderr)
        if done():
            return
        time.sleep(2)


def follow_in_background(cluster: Cluster, job: dict) -> None:
    """submit --follow=logs: the master's log on stderr while the wait goes on."""
    threading.Thread(target=follow_log, args=(cluster, job, 0, sys.stderr.write, lambda: False), daemon=True).start()


def explain_failure(cluster: Cluster, name: str) -> None:
    job = cluster.job(name)
    container = kind_of(job).container
    for pod in cluster.pods(job):
        statuses = pod.status.container_statuses or []
        failed = pod.status.phase == "Failed" or any(
            (s.state.terminated and s.state.terminated.exit_code) or (s.last_state and s.last_state.terminated)
            for s in statuses
        )
        if not failed:
            continue
        # A container that failed and was restarted holds its failure in the previous instance's log.
        restarted = any(s.name == container and s.restart_count and not s.state.terminated for s in statuses)
        which = "previous container's" if restarted else "last"
        print(f"--- {pod.metadata.name} ({pod.status.phase}): {which} log lines", file=sys.stderr)
        try:
            log = cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace, container=container,
                                                       tail_lines=30, previous=restarted)  # fmt: skip
        except cluster.client.exceptions.ApiException as err:
            log = f"(no log: {err.reason})"
        print(log.rstrip(), file=sys.stderr)
        print(f"--- {pod.metadata.name}: events", file=sys.stderr)
        for line in pod_event_lines(cluster, pod.metadata.name):
            print(f"  {line}", file=sys.stderr)
