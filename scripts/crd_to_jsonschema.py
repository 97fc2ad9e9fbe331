#!/usr/bin/env python3
"""Turns a CustomResourceDefinition into the strict JSON schema kubeconform reads, one file per version.

    python scripts/crd_to_jsonschema.py kubeflow.org_pytorchjobs.yaml OUT_DIR
    kubeconform -strict -schema-location \
        'OUT_DIR/{{ .ResourceKind }}-{{ .Group }}-{{ .ResourceAPIVersion }}.json' job.yaml

Strict means what the API server's structural-schema pruning would drop is an error here: objects
with declared properties admit no others (unless the CRD preserves unknown fields), and
int-or-string fields take either type.
"""

import json
import sys
from pathlib import Path

import yaml


def strict(schema: dict) -> dict:
    schema = dict(schema)
    if schema.pop("x-kubernetes-int-or-string", False):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = schema.pop("x-kubernetes-preserve-unknown-fields", False)
    for key in list(schema):
        if key.startswith("x-kubernetes-"):
            del schema[key]
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if not preserve and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        schema["items"] = strict(schema["items"])
    return schema


def main() -> None:
    crd = yaml.safe_load(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    kind, group = crd["spec"]["names"]["kind"].lower(), crd["spec"]["group"]
    for version in crd["spec"]["versions"]:
        schema = strict(version["schema"]["openAPIV3Schema"])
        # apiVersion/kind/metadata are the API server's, not the CRD's, to check.
        schema["properties"].update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                     "metadata": {"type": "object"}})  # fmt: skip
        (out / f"{kind}-{group}-{version['name']}.json").write_text(json.dumps(schema))


if __name__ == "__main__":
    main()
