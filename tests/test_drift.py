"""One source per option and per shared constant: the chart, its schema, the submitter and the docs
follow the trainer's parser (training/config.py) and the few definitions below, or these fail."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import pytest
import yaml
from support import BUCKET_VALUES, ROOT

from training.config import AtLeast, ObjectUrl, build_parser, flag, options

CHART = ROOT / "charts" / "petal"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# The chart's own meaning for these: null = <outputPrefix>/<job name>, not the trainer's default.
CHART_DERIVED = {"output"}


def unusual_value(action: argparse.Action):
    """A valid value for the option that is not its default and survives YAML and shell quoting."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return not action.default
    if action.choices:
        return next(c for c in reversed(action.choices) if c != action.default)
    if isinstance(action.type, AtLeast):
        return action.type.low + 7 if action.type.kind is int else 0.25
    if isinstance(action.type, ObjectUrl):
        return f"s3://other-bucket/{action.dest} #1"
    return f"/{action.dest}/with space #2" if action.type is Path else f"{action.dest},x #3"


def rendered_args(*helm_args: str) -> list[str]:
    result = subprocess.run(["helm", "template", "drift", str(CHART), *BUCKET_VALUES, *helm_args],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (job,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "PyTorchJob"]
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]


def test_the_chart_schema_is_generated_from_the_trainers_parser():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart_schema.py"), "--check"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_charts_training_defaults_are_the_trainers():
    trainer = options()
    unknown = set(VALUES["training"]) - set(trainer)
    assert not unknown, f"values.yaml lists training keys the trainer has no option for: {unknown}"
    for key, value in VALUES["training"].items():
        if key not in CHART_DERIVED:
            assert value == trainer[key].default, f"training.{key}: chart {value!r}, trainer {trainer[key].default!r}"


def test_every_training_value_reaches_the_trainer_as_its_own_flag(tmp_path):
    chosen = {key: unusual_value(action) for key, action in options().items()}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"training": chosen}))
    parsed = vars(build_parser().parse_args(rendered_args("--values", str(values))))
    for key, action in options().items():
        expected = chosen[key]
        assert parsed[action.dest] == (Path(expected) if action.type is Path else expected), key


def test_null_leaves_an_option_at_the_trainers_default():
    args = rendered_args("--set", "training.lr=null", "--set", "training.epochs=null")
    assert not [a for a in args if a.startswith(("--lr=", "--epochs="))]


def test_the_submitter_has_the_trainers_flag_for_every_listed_training_value(tmp_path):
    listed = {key: action for key, action in options().items() if key in VALUES["training"]}
    argv = [arg for key, action in listed.items() for arg in submit_flag(action, unusual_value(action))]
    submit = [sys.executable, str(ROOT / "scripts" / "submit.py"), "--dry-run", "--name", "drift"]
    result = subprocess.run([*submit, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (job,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "PyTorchJob"]
    args = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    parsed = vars(build_parser().parse_args(args))
    for key, action in listed.items():
        expected = unusual_value(action)
        assert parsed[action.dest] == (Path(expected) if action.type is Path else expected), key


def submit_flag(action: argparse.Action, value) -> list[str]:
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag(action) if value else flag(action).replace("--", "--no-", 1)]
    return [flag(action), str(value)]


# Shared constants: each has one definition; the files that repeat it for people to read are checked.
def versions_env(name: str) -> str:
    return re.search(rf"^{name}=(.*)$", (ROOT / "scripts" / "versions.env").read_text(), flags=re.M)[1]


def tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    texts = {}
    for name in names:
        try:
            texts[name] = (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
    return texts


class Constant(NamedTuple):
    value: str  # its one definition
    patterns: list[str]  # whose first group repeats it
    mentioned_in: list[str]  # files that must say it
    everywhere: bool = True  # patterns looked for in every tracked file outside tests/, else in mentioned_in only


CONSTANTS = {
    "training-operator version": Constant(
        versions_env("TRAINING_OPERATOR_VERSION"),
        [r"training-operator[^\s\"']*\?ref=(v[0-9.]+)", r"TRAINING_OPERATOR_VERSION: (v[0-9.]+)"],
        ["manifests/README.md", ".github/workflows/ci.yml"],
    ),
    "storage Secret name": Constant(
        VALUES["s3"]["existingSecret"],
        [
            r"secret generic ([\w.-]+)[\s\\]*--from-literal=AWS_",
            r"get secret ([\w.-]+) -o jsonpath='\{\.data\.AWS_",
            r"secretKeyRef: \{name: ([\w.-]+), key: AWS_",
            r"secretRef: \{name: ([\w.-]+)",
        ],
        [
            "docs/production.md",
            "manifests/README.md",
            "manifests/minio-dev.yaml",
            "manifests/trainer-runtime.yaml",
            ".github/workflows/ci.yml",
        ],
    ),
    # The chart runs petal's pods as the user the image's files belong to (other images, MinIO's, and the
    # chart's tests have other users: only petal's files are looked at).
    "the image's user": Constant(
        str(VALUES["podSecurityContext"]["runAsUser"]),
        [
            r"(?m)^USER (\d+)",
            r"(?m)^USER \d+:(\d+)",
            r"chown (\d+):",
            r"chown \d+:(\d+)",
            r"(?:runAsUser|runAsGroup|fsGroup): (\d+)",
            r"UID (\d+)",
        ],
        [
            "Dockerfile",
            "manifests/pytorchjob.yaml",
            "manifests/trainjob.yaml",
            "manifests/trainer-runtime.yaml",
            "docs/kubernetes.md",
        ],
        everywhere=False,
    ),
    "MinIO endpoint in the cluster": Constant(
        urlparse(VALUES["s3"]["endpoint"]).netloc,
        [r"(minio\.[\w.-]+\.svc\.cluster\.local:[0-9]+)"],
        [
            "docs/testbed.md",
            "manifests/minio-dev.yaml",
            "manifests/trainer-runtime.yaml",
            ".github/workflows/ci.yml",
            "scripts/smoke.sh",
        ],
    ),
    "MLflow release (the test bed's server, the trainer's client)": Constant(
        versions_env("MLFLOW_VERSION"),
        [r"mlflow-skinny==([\w.]+)", r"`mlflow server` (\d[\w.]*)"],
        ["pyproject.toml", "docs/testbed.md"],
    ),
}


@pytest.mark.parametrize("name", CONSTANTS)
def test_a_shared_constant_has_one_value_everywhere(name):
    value, patterns, mentioned_in, everywhere = CONSTANTS[name]
    texts = tracked_text_files()
    differing = sorted(
        f"{path}: {found}"
        for path, text in texts.items()
        if everywhere or path in mentioned_in
        for pattern in patterns
        for found in re.findall(pattern, text)
        if found != value and not path.startswith("tests/")
    )
    assert not differing, f"{name} is {value!r} where it is defined, but elsewhere: {differing}"
    missing = [path for path in mentioned_in if value not in texts[path]]
    assert not missing, f"{name} {value!r} is not what these files say: {missing}"


def test_the_submitters_install_hints_name_the_pinned_versions():
    from petal.kinds import PYTORCHJOB, TRAINJOB, install_kueue_hint

    assert f"?ref={versions_env('TRAINING_OPERATOR_VERSION')}" in PYTORCHJOB.install_hint()
    assert f"?ref={versions_env('KUBEFLOW_TRAINER_VERSION')}" in TRAINJOB.install_hint()
    assert f"/download/{versions_env('KUEUE_VERSION')}/" in install_kueue_hint()


# The test bed's layers: each file may use the functions of those before it, never of one after it.
LAYERS = ("common", "tools", "minio", "mlflow", "images", "cluster", "trainer", "dra")
TESTBED_LAYERS = [*(f"scripts/testbed/{name}.sh" for name in LAYERS), "scripts/testbed.sh"]


def shell_functions(text: str) -> set[str]:
    return set(re.findall(r"^([a-z_][a-z0-9_]*)\(\) *\{", text, flags=re.M))


def test_the_test_bed_layers_never_call_up():
    texts = {path: (ROOT / path).read_text() for path in TESTBED_LAYERS}
    sourced = re.findall(r"for layer in ([a-z ]+); do", texts["scripts/testbed.sh"])[0].split()
    assert [f"scripts/testbed/{name}.sh" for name in sourced] == TESTBED_LAYERS[:-1], "sourced in layer order"
    for lower, path in enumerate(TESTBED_LAYERS):
        code = "\n".join(line.split(" #")[0] for line in texts[path].splitlines() if not line.lstrip().startswith("#"))
        for upper in TESTBED_LAYERS[lower + 1 :]:
            called = {f for f in shell_functions(texts[upper]) if re.search(rf"(?<![\w.-]){f}(?![\w.-])", code)}
            assert not called, f"{path} calls {sorted(called)}, defined above it in {upper}"


def test_nothing_is_stopped_by_a_name_pattern():
    # Spelled in pieces so that this file is not itself a match for `grep -rn` of those commands.
    by_name = re.compile(r"\b(" + "p" + "kill|kill" + "all)\b")
    assert not [path for path, text in tracked_text_files().items() if by_name.search(text)]


def test_the_test_beds_coredns_has_every_plugin_its_corefile_uses():
    testbed = ROOT / "scripts" / "testbed"
    plugins = re.search(r'^COREDNS_PLUGINS="([a-z ]+)"', (testbed / "common.sh").read_text(), re.M)[1]
    corefile = re.search(r'"\$dir/Corefile" <<EOF\n(.*?)\nEOF', (testbed / "cluster.sh").read_text(), re.S)[1]
    directives = set(re.findall(r"^    ([a-z]+)\b", corefile, re.M))
    assert "kubernetes" in directives  # the pattern still reads the Corefile
    assert directives <= set(plugins.split())
