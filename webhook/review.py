"""AdmissionReview (admission.k8s.io/v1) in and out. Pure: bytes -> request, decision -> response dict."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

API_VERSION = "admission.k8s.io/v1"


class ReviewError(ValueError):
    """The body is not an AdmissionReview this webhook can answer; the message says why (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class Request:
    uid: str
    namespace: str
    operation: str
    pod: dict[str, Any]


def parse(body: bytes) -> Request:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ReviewError(f"the body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ReviewError("the body is not an AdmissionReview object")
    if doc.get("kind") != "AdmissionReview":
        raise ReviewError(f"kind must be AdmissionReview, got {doc.get('kind')!r}")
    if doc.get("apiVersion") != API_VERSION:
        raise ReviewError(f"apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise ReviewError("request is missing")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid is missing")
    kind = request.get("kind") or {}
    if not isinstance(kind, dict) or kind.get("kind") != "Pod" or kind.get("group", "") != "":
        raise ReviewError(
            f"this webhook injects Pods, got kind {kind.get('kind') if isinstance(kind, dict) else kind!r}"
        )
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise ReviewError("request.object is missing")
    if not isinstance(pod.get("spec"), dict) or not isinstance(pod["spec"].get("containers"), list):
        raise ReviewError("request.object is not a Pod (no spec.containers)")
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
    return Request(uid, str(namespace), str(request.get("operation") or "CREATE"), pod)


def allow(uid: str, patch: list[dict[str, Any]] | None = None, warning: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    if warning:
        response["warnings"] = [warning]
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def deny(uid: str, message: str, code: int = 400) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": False, "status": {"code": code, "message": message}},
    }
