"""The injector's one entry point for a pod, shared by the webhook and `meshctl inject`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .annotations import InvalidAnnotation, proxy_options, unsupported
from .config import InjectionConfig
from .patch import diff
from .policy import STATUS, Decision, decide, injected_by_istio
from .sidecar import render, uninject_istio


class InjectionError(ValueError):
    """The pod cannot be given a working sidecar (a name Envoy's bootstrap cannot carry, a port that is
    not one, no mesh roots to verify the control plane with); the message says which."""


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    pod: dict[str, Any]
    """The injected pod, or the original when not injected."""
    patch: list[dict[str, Any]]
    error: InvalidAnnotation | InjectionError | None = None
    """Set when the pod is to be denied: an invalid annotation (unless configured to ignore them), or
    a pod that cannot get a working sidecar."""
    warnings: tuple[str, ...] = ()
    """Istio annotations of an injected pod that Meshplane ignores, and what happens instead."""


def inject(
    pod: dict[str, Any], namespace: str, config: InjectionConfig, namespace_labels: Mapping[str, str] | None = None
) -> Outcome:
    original = pod
    migrating = injected_by_istio((pod.get("metadata") or {}).get("annotations") or {})
    if migrating:  # Istio injected it: judge and inject the pod as it was before (migration)
        pod = uninject_istio(pod)
    decision = decide(pod, namespace, config, namespace_labels)
    if not decision.inject:  # left as it is, Istio's sidecar included
        return Outcome(decision, original, [])
    if migrating:
        decision = Decision(True, f"{decision.reason}; Istio's sidecar ({STATUS}) replaced")
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        options = proxy_options(annotations, config)
    except InvalidAnnotation as e:
        if not config.ignore_invalid_annotations:
            return Outcome(decision, original, [], e)
        options = proxy_options({k: v for k, v in annotations.items() if k != e.name}, config)
    try:
        mutated = render(pod, namespace, config, options)
    except ValueError as e:  # BootstrapError and malformed values the API server would have refused
        return Outcome(decision, original, [], InjectionError(str(e)))
    return Outcome(decision, mutated, diff(original, mutated), warnings=tuple(unsupported(annotations)))
