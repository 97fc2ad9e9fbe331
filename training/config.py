"""Every trainer option, declared once: this parser is `python -m training --help`.

Each option can also come from the environment, as PETAL_ and its flag in upper case with '_' for
'-' (`--batch-size` is PETAL_BATCH_SIZE; a boolean takes true or false): what a job started without
arguments (a TrainJob from the Kubeflow SDK) is given. A flag on the command line wins over its
variable; a bad value gets the flag's own error, naming the variable.

Nothing else declares them. The chart's `training:` values are this parser's options in camelCase
(`--batch-size` is `training.batchSize`) and reach the pods as `--batch-size=<value>`; the chart's
schema for them is generated from here (`python scripts/chart_schema.py`), `scripts/submit.py` makes
its training flags from the keys in `charts/petal/values.yaml` with the types, choices and help
below, and tests/test_options.py fails when any of them drifts from this file. No torch here, so the
submitter can read it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from training.storage import parse_url

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
FREEZE_CHOICES = ("fc", "layer4", "none")
# Options that are the pod's business, not the run's: the chart sets them itself (PETAL_CACHE_DIR).
POD_LOCAL = {"cache_dir"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad value gets one line (the usage block is what --help is for), naming the
    environment variable it came from, if it did."""

    from_environment: dict[str, str] = {}  # flag: the variable that gave it, for this parse

    def error(self, message: str):
        source = next((f" (from {name})" for flag_, name in self.from_environment.items()
                       if message.startswith(f"argument {flag_}")), "")  # fmt: skip
        self.exit(2, f"{self.prog}: error: {message}{source} (see --help)\n")


def non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


class AtLeast:
    """An argparse type for a finite number >= low; `schema` is its JSON schema for the chart."""

    def __init__(self, kind: type, low: float):
        self.kind, self.low = kind, low
        self.schema = {"type": "integer" if kind is int else "number", "minimum": low}

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if self.kind is int else 'number'}"
            ) from None
        if not (value >= self.low and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {self.low}")
        return value


class ObjectUrl:
    """An s3://BUCKET/PREFIX argument, optionally one of a few keywords instead."""

    def __init__(self, *keywords: str):
        self.keywords = keywords
        url = {"$ref": "#/definitions/s3url"}
        self.schema = {"anyOf": [{"enum": list(keywords)}, url]} if keywords else url

    def __call__(self, text: str) -> str:
        if text in self.keywords:
            return text
        try:
            parse_url(text)
        except ValueError as err:
            if not self.keywords:
                raise argparse.ArgumentTypeError(str(err)) from None
            raise argparse.ArgumentTypeError(f"{text!r} is not {', '.join(self.keywords)} or s3://BUCKET/KEY") from None
        return text.rstrip("/")


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m training",
        description="Transfer-learn a ResNet on a petal dataset in object storage (DDP; resumes from --output).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=ObjectUrl(), required=True,
                   help="dataset prefix (its index.json), e.g. s3://my-bucket/datasets/flowers102")  # fmt: skip
    p.add_argument("--output", type=ObjectUrl(), required=True,
                   help="run directory, e.g. s3://my-bucket/runs/flowers-1; resumed if it holds a "
                        "checkpoint")  # fmt: skip
    p.add_argument("--train-splits", default="train", help="comma-separated splits to train on, e.g. train,augment")
    p.add_argument("--val-split", default="valid", help="split to validate on")
    p.add_argument("--arch", choices=ARCHS, default="resnet152", help="torchvision ResNet")
    p.add_argument("--freeze", choices=FREEZE_CHOICES, default="fc",
                   help="fc: train only the new head; layer4: also the last stage; none: everything")  # fmt: skip
    p.add_argument("--pretrained", type=ObjectUrl("imagenet", "none"), default="imagenet",
                   help="backbone weights: imagenet, none, or an s3:// state_dict (air-gapped clusters)")  # fmt: skip
    p.add_argument("--epochs", type=AtLeast(int, 1), default=12, help="epochs to train")
    p.add_argument("--batch-size", type=AtLeast(int, 1), default=32, help="batch size per rank")
    p.add_argument("--global-batch-size", type=AtLeast(int, 0), default=0,
                   help="keep the recipe as the world grows: the batch summed over ranks, each rank taking "
                        "its share (it must divide evenly); 0: --batch-size per rank")  # fmt: skip
    p.add_argument("--lr", type=AtLeast(float, 1e-12), default=0.001, help="learning rate")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="sgd uses momentum 0.9")
    p.add_argument("--weight-decay", type=AtLeast(float, 0), default=0.0, help="L2 penalty of the optimizer")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine", help="per-epoch schedule")
    p.add_argument("--warmup-epochs", type=AtLeast(float, 0), default=0.0,
                   help="raise the rate linearly from 0 over this many epochs (fractions allowed), per step: "
                        "what a large global batch needs")  # fmt: skip
    p.add_argument("--image-size", type=AtLeast(int, 16), default=224, help="crop side in pixels")
    p.add_argument("--workers", type=AtLeast(int, 0), default=4, help="DataLoader workers per rank")
    p.add_argument("--seed", type=AtLeast(int, 0), default=0, help="data order and augmentation")
    p.add_argument("--checkpoint-every", type=AtLeast(int, 0), default=100,
                   help="also write a checkpoint every N optimizer steps, so a lost pod costs at most N steps "
                        "and those of an upload still in flight (0: at epoch ends only; SIGTERM always writes "
                        "one)")  # fmt: skip
    p.add_argument("--collective-timeout", type=AtLeast(float, 0.1), default=10.0,
                   help="minutes a collective may wait for the other ranks before this rank gives up "
                        "(exit 202, retried by restartPolicy ExitCode)")  # fmt: skip
    p.add_argument("--overwrite-unresumable", action=argparse.BooleanOptionalAction, default=False,
                   help="an --output holding a run's results (metrics.jsonl, best.pt, checkpoints) but no intact "
                        "checkpoint is refused (exit 4) rather than overwritten; with this, training starts afresh "
                        "there and replaces them")  # fmt: skip
    p.add_argument("--keep-checkpoints", type=AtLeast(int, 1), default=3,
                   help="checkpoints kept in the run directory (best.pt is kept apart)")  # fmt: skip
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision on CUDA (auto: bf16 on GPUs that have it natively, compute "
                        "capability 8.0+; else fp16 with a GradScaler); ignored on CPU")  # fmt: skip
    p.add_argument("--sync-batchnorm", choices=("auto", "on", "off"), default="auto",
                   help="BatchNorm statistics over every rank's batch at once (SyncBatchNorm, GPUs only); auto: "
                        "where BatchNorm trains (--freeze layer4 or none) on more than one GPU rank")  # fmt: skip
    p.add_argument("--decode", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where training images are decoded: gpu: nvJPEG on the rank's GPU, batch by batch "
                        "(the DataLoader workers only read bytes); cpu: PIL in the workers; auto: gpu where it "
                        "works")  # fmt: skip
    p.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="with --freeze fc, run the frozen backbone once per image view and train the "
                        "head from its cached features; --no-feature-cache recomputes it every epoch "
                        "(the seed's way)")  # fmt: skip
    p.add_argument("--cache-views", type=AtLeast(int, 1), default=2,
                   help="feature cache: the eval view plus N-1 augmented views per training image")  # fmt: skip
    p.add_argument("--feature-cache-dir", type=Path, default=None,
                   help="keep cached features in this pod-local directory (default: in memory)")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/petal-cache"),
                   help="pod-local shard cache (the chart sets PETAL_CACHE_DIR)")  # fmt: skip
    p.add_argument("--log-every", type=AtLeast(int, 1), default=20, help="progress line every N steps")
    p.add_argument("--mlflow-experiment", type=non_empty, default="petal",
                   help="where MLFLOW_TRACKING_URI names a tracking server: the MLflow experiment rank 0 logs "
                        "to, in a run named after --output's last part (a resumed run goes on in its run)")  # fmt: skip
    return p


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> argparse.Namespace:
    """The command line's options over those of the environment (os.environ unless given)."""
    parser = build_parser()
    given = sys.argv[1:] if argv is None else argv
    parser.from_environment = {}
    from_env = []
    for action in parser._actions:
        name = environment_name(action) if action.option_strings and action.dest != "help" else None
        value = (os.environ if environ is None else environ).get(name) if name else None
        if value is None or any(arg.split("=")[0] in action.option_strings for arg in given):
            continue
        parser.from_environment[flag(action)] = name
        if isinstance(action, argparse.BooleanOptionalAction):
            if value.lower() not in ("true", "false"):
                parser.error(f"{name}={value!r}: expected true or false")
            from_env.append(flag(action) if value.lower() == "true" else f"--no-{flag(action)[2:]}")
        else:
            from_env.append(f"{flag(action)}={value}")
    return parser.parse_args([*from_env, *given])


def environment_name(action: argparse.Action) -> str:
    """The variable an option may come from: --batch-size is PETAL_BATCH_SIZE."""
    return "PETAL_" + flag(action)[2:].replace("-", "_").upper()


def options(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.Action]:
    """The run's options by chart key (camelCase of the flag): what a chart value may set."""
    actions = (parser or build_parser())._actions
    return {camel(a.dest): a for a in actions if a.option_strings and a.dest not in POD_LOCAL | {"help"}}


def camel(dest: str) -> str:
    first, *rest = dest.split("_")
    return first + "".join(word.capitalize() for word in rest)


def flag(action: argparse.Action) -> str:
    """The option's long flag (for a boolean, its positive form)."""
    return next(s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-"))


def schema(action: argparse.Action) -> dict:
    """The JSON schema of one option's chart value; null leaves it at the trainer's default."""
    if isinstance(action, argparse.BooleanOptionalAction):
        value = {"type": "boolean"}
    elif action.choices:
        value = {"enum": list(action.choices)}
    else:
        value = getattr(action.type, "schema", {"type": "string", "minLength": 1})
    return {"description": action.help, "anyOf": [*value.get("anyOf", [value]), {"type": "null"}]}
