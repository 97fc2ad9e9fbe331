"""Picks, from an upstream project's rendered manifests (stdin), what the test bed applies itself: its
CRDs and webhook configurations, pointed at a namespace and — where the test bed made the webhook's
certificate — given its CA. Everything that runs a controller in a pod is left out: the test bed runs
the controllers as host processes.

    kubectl kustomize DIR | python scripts/testbed/manifests.py --kinds CustomResourceDefinition \\
        --webhooks mjobset.kb.io,vjobset.kb.io --namespace jobset-system --ca-bundle ca.crt
"""

from __future__ import annotations

import argparse
import base64
import sys

import yaml

WEBHOOK_KINDS = {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="", help="comma-separated kinds to keep besides the webhooks")
    parser.add_argument("--webhooks", default="", help="comma-separated webhook names to keep (default: all)")
    parser.add_argument("--namespace", help="the namespace the webhooks' Service is in")
    parser.add_argument("--ca-bundle", help="PEM file to set as every webhook's caBundle")
    args = parser.parse_args()
    kinds, names = set(filter(None, args.kinds.split(","))), set(filter(None, args.webhooks.split(",")))
    ca = base64.b64encode(open(args.ca_bundle, "rb").read()).decode() if args.ca_bundle else None
    kept = []
    for doc in yaml.safe_load_all(sys.stdin):
        if not doc:
            continue
        if doc["kind"] in WEBHOOK_KINDS:
            doc["webhooks"] = [w for w in doc["webhooks"] if not names or w["name"] in names]
            for webhook in doc["webhooks"]:
                if args.namespace:
                    webhook["clientConfig"]["service"]["namespace"] = args.namespace
                if ca:
                    webhook["clientConfig"]["caBundle"] = ca
            kept.append(doc)
        elif doc["kind"] in kinds:
            kept.append(doc)
    yaml.safe_dump_all(kept, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
