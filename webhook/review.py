"""AdmissionReview (admission.k8s.io/v1) in and out. Pure: bytes -> request, decision -> response dict."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
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
        doc = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ReviewError(f"the body is not JSON: {e}") from None
    except RecursionError:
        raise ReviewError("the body is JSON nested too deeply for an AdmissionReview") from None
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
    _check(pod, _POD, "request.object")
    operation = request.get("operation")
    if operation is not None and not isinstance(operation, str):
        raise ReviewError(f"request.operation must be a string, got {_kind(operation)}")
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
    if not isinstance(namespace, str) or not _DNS_LABEL.match(namespace):
        raise ReviewError(f"request.namespace {str(namespace)[:80]!r} is not a Kubernetes namespace name")
    for field in ("serviceAccountName", "serviceAccount"):
        account = pod["spec"].get(field)
        if account and not _DNS_NAME.match(account):
            raise ReviewError(f"request.object.spec.{field} {account[:80]!r} is not a valid service account name")
    return Request(uid, namespace, operation or "CREATE", pod)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# The parts of a Pod the injector reads, with the types the API server guarantees (it decodes the
# object into typed structs before calling webhooks). Anything else is not a Pod from an API server,
# and a 400 that names the field beats an injector that trips over it. Unlisted fields pass as sent.
_STR, _INT, _BOOL = "a string", "an integer", "a boolean"
_SECONDS = "an integer from 0 to 2147483647"
_NUMBER = "a port number from 1 to 65535"
_PORT = "a port number from 1 to 65535 or a port name"
_STR_MAP = "a map of strings"
_PROBE: dict[str, Any] = {
    "httpGet": {"port": _PORT, "path": _STR, "host": _STR, "scheme": _STR},
    "tcpSocket": {"port": _PORT, "host": _STR},
    "grpc": {"port": _NUMBER, "service": _STR},
    "periodSeconds": _SECONDS,
    "timeoutSeconds": _SECONDS,
}
_CONTAINER: dict[str, Any] = {
    "name": _STR,
    "image": _STR,
    "ports": [{"name": _STR, "containerPort": _NUMBER}],
    "livenessProbe": _PROBE,
    "readinessProbe": _PROBE,
    "startupProbe": _PROBE,
}
_POD: dict[str, Any] = {
    "metadata": {
        "name": _STR,
        "generateName": _STR,
        "namespace": _STR,
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
    "spec": {
        "containers": [_CONTAINER],
        "initContainers": [_CONTAINER],
        "volumes": [{}],
        "hostNetwork": _BOOL,
        "serviceAccountName": _STR,
        "serviceAccount": _STR,
        "terminationGracePeriodSeconds": _INT,
    },
}
_MAX_INT = 2**63 - 1
_DIGITS = re.compile(r"^[0-9]+$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")
"""IANA_SVC_NAME, as Kubernetes port names (15 characters at most)."""
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check(value: Any, shape: Any, where: str) -> None:
    """Raise `ReviewError` naming the first field of `value` not of `shape`. A field may be absent but
    not null: the API server omits empty fields, and the injector treats a present field as set."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise ReviewError(f"{where} must be an object, got {_kind(value)}")
        for key, inner in shape.items():
            if key in value:
                _check(value[key], inner, f"{where}.{key}")
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise ReviewError(f"{where} must be a list, got {_kind(value)}")
        for i, item in enumerate(value):
            _check(item, shape[0], f"{where}[{i}]")
    elif shape == _STR_MAP:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ReviewError(f"{where} must be {shape}, got {_kind(value)}")
    else:
        if shape == _STR:
            ok = isinstance(value, str)
        elif shape == _BOOL:
            ok = isinstance(value, bool)
        elif shape == _INT:
            ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_INT
        elif shape == _SECONDS:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**31 - 1
        elif shape == _NUMBER:
            ok = _is_port(value)
        else:  # _PORT; a string of digits is read as a number downstream, so it must be one
            ok = _is_port(value) or (
                isinstance(value, str)
                and (
                    len(value) <= 5 and _is_port(int(value)) if _DIGITS.match(value) else bool(_PORT_NAME.match(value))
                )
            )
        if not ok:
            raise ReviewError(f"{where} must be {shape}, got {_kind(value)}")


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _kind(value: Any) -> str:
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "a list"
    text = json.dumps(value)  # null, true, 7, "text": as the client sent it
    return text if len(text) <= 80 else text[:77] + "..."


def allow(uid: str, patch: list[dict[str, Any]] | None = None, warnings: Sequence[str] = ()) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    if warnings:  # shown by kubectl
        response["warnings"] = list(warnings)
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def deny(uid: str, message: str, code: int = 400) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": False, "status": {"code": code, "message": message}},
    }
