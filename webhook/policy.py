"""Whether a pod gets a sidecar, and why: Istio's rules, as one pure function.

In order: pods on the host network and in system namespaces never; a pod this injector already
injected not twice (one Istio injected is judged as the pod it was, to be un-injected first);
a revision label for another control plane no; the namespace's
`istio-injection`/`mesh-injection` label when it is disabled; the pod's
`sidecar.istio.io/inject` label (it wins over the legacy annotation of the same name); then
`neverInjectSelector` (beats `alwaysInjectSelector`); then the namespace label when it is
enabled; then the default policy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import InjectionConfig

INJECT = "sidecar.istio.io/inject"
STATUS = "sidecar.istio.io/status"
REVISION = "istio.io/rev"
NAMESPACE_LABELS = ("istio-injection", "mesh-injection")
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
ISTIO_CONTAINERS = frozenset({"istio-proxy", "istio-init", "istio-validation"})
"""What Istio's injector adds, as its `sidecar.istio.io/status` lists them."""
MESH_CONTAINERS = frozenset({"mesh-proxy", "mesh-init"})
_YES = {"y", "yes", "true", "on", "enabled"}
_NO = {"n", "no", "false", "off", "disabled"}


@dataclass(frozen=True, slots=True)
class Decision:
    inject: bool
    reason: str


def decide(
    pod: Mapping[str, Any], namespace: str, config: InjectionConfig, namespace_labels: Mapping[str, str] | None = None
) -> Decision:
    """Decide for `pod` in `namespace`. `namespace_labels` is None where the caller does not know
    them (the webhook: its namespaceSelector already chose; `meshctl inject`: the user asked)."""
    meta = pod.get("metadata") or {}
    labels: Mapping[str, str] = meta.get("labels") or {}
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    ns_labels = namespace_labels or {}

    if (pod.get("spec") or {}).get("hostNetwork"):
        return Decision(False, "the pod uses the host network")
    if namespace in SYSTEM_NAMESPACES:
        return Decision(False, f"namespace {namespace} is never injected")
    if STATUS in annotations and not injected_by_istio(annotations):
        return Decision(False, f"already injected ({STATUS} is set)")
    revision = labels.get(REVISION) or ns_labels.get(REVISION)
    if revision and revision != config.revision:
        return Decision(False, f"{REVISION}={revision} is another control plane's (this one is {config.revision})")
    namespace_says = next((ns_labels[k] for k in NAMESPACE_LABELS if k in ns_labels), None)
    if namespace_says is not None and namespace_says.lower() in _NO:
        return Decision(False, f"namespace {namespace} has injection disabled")

    for where, value in (("label", labels.get(INJECT)), ("annotation", annotations.get(INJECT))):
        if value is None:
            continue
        if value.lower() in _YES:
            return Decision(True, f"pod {where} {INJECT}={value}")
        if value.lower() in _NO:
            return Decision(False, f"pod {where} {INJECT}={value}")
    if any(s.matches(labels) for s in config.never_inject):
        return Decision(False, "the pod matches neverInjectSelector")
    if any(s.matches(labels) for s in config.always_inject):
        return Decision(True, "the pod matches alwaysInjectSelector")
    if namespace_says is not None and namespace_says.lower() in _YES:
        return Decision(True, f"namespace {namespace} has injection enabled")
    if revision:
        return Decision(True, f"{REVISION}={revision} is this control plane")
    if config.enabled_by_default:
        return Decision(True, "the default policy is enabled")
    return Decision(False, "the default policy is disabled and nothing asked for injection")


def injected_by_istio(annotations: Mapping[str, str]) -> bool:
    """Whether `sidecar.istio.io/status` was written by Istio's injector, not Meshplane's: it names Istio's
    containers and none of Meshplane's. Anything else (unreadable, `{}`) counts as injected already."""
    try:
        status = json.loads(annotations.get(STATUS) or "")
    except (ValueError, TypeError):
        return False
    if not isinstance(status, dict):
        return False
    names = {
        n
        for key in ("containers", "initContainers")
        if isinstance(status.get(key), list)
        for n in status[key]
        if isinstance(n, str)
    }
    return bool(names & ISTIO_CONTAINERS) and not names & MESH_CONTAINERS
