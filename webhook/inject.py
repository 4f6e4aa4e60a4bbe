"""The injector's one entry point for a pod, shared by the webhook and `meshctl inject`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .annotations import InvalidAnnotation, proxy_options
from .config import InjectionConfig
from .patch import diff
from .policy import Decision, decide
from .sidecar import render


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    pod: dict[str, Any]
    """The injected pod, or the original when not injected."""
    patch: list[dict[str, Any]]
    error: InvalidAnnotation | None = None
    """Set when an annotation was invalid: the pod is to be denied (unless configured to ignore)."""


def inject(
    pod: dict[str, Any], namespace: str, config: InjectionConfig, namespace_labels: Mapping[str, str] | None = None
) -> Outcome:
    decision = decide(pod, namespace, config, namespace_labels)
    if not decision.inject:
        return Outcome(decision, pod, [])
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        options = proxy_options(annotations, config)
    except InvalidAnnotation as e:
        if not config.ignore_invalid_annotations:
            return Outcome(decision, pod, [], e)
        options = proxy_options({k: v for k, v in annotations.items() if k != e.name}, config)
    mutated = render(pod, namespace, config, options)
    return Outcome(decision, mutated, diff(pod, mutated))
