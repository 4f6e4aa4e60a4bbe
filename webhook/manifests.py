"""`meshctl inject`: the webhook's injection applied to multi-document YAML manifests.

Pods, and the pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets,
ReplicationControllers, Jobs, CronJobs and OpenShift DeploymentConfigs, are injected exactly as the
webhook would (a template Istio injected is un-injected first); every other document passes through.
Round-trip YAML keeps comments and document order outside the pod specs it rewrites.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .config import InjectionConfig
from .inject import inject

TEMPLATE_KINDS = {
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "Job",
    "DeploymentConfig",
}
"""Kinds whose pod template is `spec.template` (DeploymentConfig: OpenShift's apps.openshift.io/v1)."""


class ManifestError(ValueError):
    """A manifest that cannot be read, or a pod in it that the webhook would deny."""


def inject_manifests(text: str, config: InjectionConfig, source: str = "<stdin>") -> tuple[str, list[str]]:
    """The injected manifests, and one line per pod-bearing document saying what was decided."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    try:
        docs = list(yaml.load_all(text))
    except YAMLError as e:
        raise ManifestError(f"{source}: not valid YAML: {e}") from None
    report = []
    for index, doc in enumerate(docs):
        for holder, key, namespace, what in _pods(doc):
            pod = json.loads(json.dumps(holder[key]))  # plain data for the pure core
            outcome = inject({"apiVersion": "v1", "kind": "Pod", **pod}, namespace, config)
            if outcome.error is not None:
                raise ManifestError(f"{source}: document {index + 1} ({what}): {outcome.error}")
            report.append(
                f"{what}: {'injected' if outcome.decision.inject else 'not injected'} ({outcome.decision.reason})"
            )
            report += [f"{what}: warning: {w}" for w in outcome.warnings]
            if outcome.decision.inject:
                injected = {k: v for k, v in outcome.pod.items() if k in pod or k in ("metadata", "spec")}
                holder[key] = injected
    out = io.StringIO()
    yaml.dump_all(docs, out)
    return out.getvalue(), report


def _pods(doc: Any) -> Iterator[tuple[Any, str, str, str]]:
    """(container of the pod spec, its key, namespace, description) for each pod in a document."""
    if not isinstance(doc, dict):
        return
    kind = doc.get("kind")
    meta = doc.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    what = f"{kind} {namespace}/{meta.get('name', '?')}"
    if kind == "Pod":
        yield _Root(doc), "pod", namespace, what
    elif kind in TEMPLATE_KINDS and isinstance((doc.get("spec") or {}).get("template"), dict):
        yield doc["spec"], "template", namespace, what
    elif kind == "CronJob":
        job = ((doc.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}
        if isinstance(job.get("template"), dict):
            yield job, "template", namespace, what
    elif kind == "List":
        for item in doc.get("items") or []:
            yield from _pods(item)


class _Root:
    """Lets a whole Pod document be read and replaced in place like a template."""

    def __init__(self, doc: Any) -> None:
        self.doc = doc

    def __getitem__(self, key: str) -> Any:
        return {k: v for k, v in self.doc.items() if k not in ("apiVersion", "kind")}

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        for k in list(self.doc):
            if k not in ("apiVersion", "kind") and k not in value:
                del self.doc[k]
        for k, v in value.items():
            if k not in ("apiVersion", "kind"):
                self.doc[k] = v
