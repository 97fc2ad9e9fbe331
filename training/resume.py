"""Where a run goes on from: rank 0 decides (the newest intact checkpoint in --output, or a fresh
start), every rank hears its decision — or its refusal, exit code and all — and each node downloads
the checkpoint once.
"""

from __future__ import annotations

from training import checkpoint, log
from training.distributed import World, any_rank, from_rank_zero
from training.exit_codes import IncompatibleCheckpoint, PeerFailed
from training.state import reconcile
from training.storage import S3Url, Storage, StorageError


def on_node_leader_first(world: World, what: str, fn):
    """fn() on each node's local rank 0 first (it downloads into the pod-local cache), then on the
    node's other ranks, which find its files: one download per node. A failure anywhere stops all."""
    error = None
    if world.local_rank == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after every rank has heard of it
            error = err
    if any_rank(error is not None):
        if error is not None:
            raise error
        raise PeerFailed(f"another rank failed while {what}")
    return fn() if world.local_rank != 0 else result


def resume_point(storage: Storage, output: S3Url, args, config: dict, classes: list[str], data: str, world: World):
    """The checkpoint every rank resumes from, as rank 0 decided it (None for a fresh run); each node
    downloads it once and verifies it. Rank 0's refusal is every rank's."""
    decision = None
    if world.is_main:
        try:
            chosen = checkpoint.choose(storage, output, args.cache_dir / "checkpoints", log,
                                       args.overwrite_unresumable)  # fmt: skip
            if chosen is not None:
                saved = checkpoint.load(None, str(checkpoint.local_path(chosen, args.cache_dir / "checkpoints")))
                reconcile(saved, config, classes, data, str(output), log)
            decision = ("resume", chosen)
        except (IncompatibleCheckpoint, checkpoint.CheckpointError, StorageError) as err:
            decision = ("refused", err)  # the error itself, class and all: its exit code is every rank's
    decision = from_rank_zero(decision)
    if decision[0] == "refused":
        raise decision[1]
    chosen = decision[1]
    if chosen is None:
        return None

    def fetch() -> dict:
        directory = args.cache_dir / "checkpoints"
        if not checkpoint.fetch(storage, output, chosen, directory):
            raise StorageError(f"{output.join(chosen['checkpoint'])} vanished or changed while the ranks resumed")
        return checkpoint.load(None, str(checkpoint.local_path(chosen, directory)))

    return on_node_leader_first(world, "downloading the checkpoint", fetch)
