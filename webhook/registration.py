"""`meshctl webhook-config`: the MutatingWebhookConfiguration that sends pods to this injector.

Shaped like Istio's: pods in namespaces labelled `istio-injection=enabled` or
`mesh-injection=enabled` or `istio.io/rev=<revision>`, and pods labelled
`sidecar.istio.io/inject=true` in namespaces that say nothing. The policy then decides.
"""

from __future__ import annotations

import base64
from typing import Any


def webhook_configuration(
    *,
    ca_bundle: bytes,
    service: str,
    namespace: str,
    port: int = 443,
    path: str = "/inject",
    revision: str = "default",
    failure_policy: str = "Fail",
    timeout_seconds: int = 10,
) -> dict[str, Any]:
    def hook(name: str, namespace_selector: dict[str, Any], object_selector: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": f"{name}.sidecar-injector.meshplane.io",
            "clientConfig": {
                "service": {"name": service, "namespace": namespace, "path": path, "port": port},
                "caBundle": base64.b64encode(ca_bundle).decode(),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": namespace_selector,
            "objectSelector": object_selector,
            "failurePolicy": failure_policy,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": timeout_seconds,
            "reinvocationPolicy": "IfNeeded",
        }

    not_disabled = {"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]}
    unlabelled = [{"key": k, "operator": "DoesNotExist"} for k in ("istio-injection", "mesh-injection", "istio.io/rev")]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": f"meshplane-sidecar-injector-{revision}", "labels": {"app": "meshplane"}},
        "webhooks": [
            hook("namespace", {"matchLabels": {"istio-injection": "enabled"}}, not_disabled),
            hook("mesh-namespace", {"matchLabels": {"mesh-injection": "enabled"}}, not_disabled),
            hook("revision", {"matchLabels": {"istio.io/rev": revision}}, not_disabled),
            hook(
                "object",
                {"matchExpressions": unlabelled},
                {"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "In", "values": ["true"]}]},
            ),
        ],
    }
