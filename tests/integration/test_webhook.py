"""The injection webhook over real HTTPS, with a client that trusts only the mesh CA."""

import asyncio
import base64
import datetime as dt
import json
import ssl
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate

from meshplane.controlplane.app import ControlPlane
from tests.harness import admin_json, wait_until

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"generateName": "web-", "labels": {"app": "web"}},
    "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]}]},
}


def review(obj: Any = POD, uid: str = "4f1c", kind: str = "Pod", operation: str = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "namespace": "shop",
            "operation": operation,
            "object": obj,
        },
    }


def client_tls(plane: ControlPlane) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=plane.ca.root_pem.decode())
    return ctx  # hostname checking on: the certificate must name 127.0.0.1


async def post(plane: ControlPlane, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"https://127.0.0.1:{plane.webhook_port}/inject",
            data=data,
            ssl=client_tls(plane),
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as r,
    ):
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def test_pods_are_injected_over_https(plane: ControlPlane) -> None:
    status, answer = await post(plane, review())
    assert status == 200
    response = answer["response"]
    assert response["uid"] == "4f1c" and response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    pod = jsonpatch.apply_patch(POD, patch)
    assert [c["name"] for c in pod["spec"]["containers"]] == ["web", "mesh-proxy"]
    kubernetes_validate.validate(pod, "1.30", strict=True)

    async with (
        aiohttp.ClientSession() as s,
        s.get(f"https://127.0.0.1:{plane.webhook_port}/healthz", ssl=client_tls(plane)) as r,
    ):
        assert r.status == 200
    assert "warnings" not in response
    metrics = await admin_json(plane.admin_port, "/metrics")
    assert 'meshplane_webhook_requests_total{result="injected"} 1.0' in metrics
    # An Istio annotation Meshplane ignores: still injected, and kubectl is told (AdmissionReview warnings).
    tuned = {**POD, "metadata": {**POD["metadata"], "annotations": {"sidecar.istio.io/extraStatTags": "a,b"}}}
    status, answer = await post(plane, review(tuned, uid="w"))
    assert status == 200 and answer["response"]["allowed"] is True and "patch" in answer["response"]
    (warning,) = answer["response"]["warnings"]
    assert warning.startswith("sidecar.istio.io/extraStatTags: not supported by Meshplane, ignored")


async def test_decisions_not_to_inject_and_denials(plane: ControlPlane) -> None:
    opted_out = {**POD, "metadata": {"labels": {"sidecar.istio.io/inject": "false"}}}
    status, answer = await post(plane, review(opted_out, uid="a"))
    assert status == 200 and answer["response"] == {"uid": "a", "allowed": True}
    status, answer = await post(plane, review(operation="UPDATE", uid="b"))
    assert answer["response"] == {"uid": "b", "allowed": True}
    bad = {**POD, "metadata": {"annotations": {"sidecar.istio.io/proxyCPU": "lots"}}}
    status, answer = await post(plane, review(bad, uid="c"))
    assert status == 200 and answer["response"]["allowed"] is False
    message = answer["response"]["status"]["message"]
    assert "sidecar.istio.io/proxyCPU" in message and "a Kubernetes quantity" in message


async def test_bad_input_gets_400_with_a_reason(plane: ControlPlane) -> None:
    cases = [
        (b"not json", "the body is not JSON"),
        (json.dumps({"kind": "Pod"}).encode(), "kind must be AdmissionReview"),
        (json.dumps({**review(), "apiVersion": "admission.k8s.io/v1beta1"}).encode(), "apiVersion must be"),
        (json.dumps({**review(), "request": {"uid": "x", "kind": {"kind": "Pod"}}}).encode(), "request.object"),
        (json.dumps(review(kind="Service")).encode(), "injects Pods"),
        (b"x" * (3 * 1024 * 1024), "larger than"),
    ]
    for body, message in cases:
        status, text = await asyncio.wait_for(post(plane, body), 10)
        assert status == 400 and message in text, (status, text)
    status, _ = await post(plane, review())  # and it still works
    assert status == 200


async def test_serving_certificate_rotates_without_a_restart(plane_factory: Any) -> None:
    plane = await plane_factory(webhook_cert_ttl=dt.timedelta(seconds=2))

    async def serial() -> int:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", plane.webhook_port, ssl=client_tls(plane), server_hostname="127.0.0.1"
        )
        cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        from cryptography import x509

        return x509.load_der_x509_certificate(cert).serial_number

    first = await serial()

    async def rotated() -> bool:
        return await serial() != first

    await wait_until(rotated, timeout=5, interval=0.2, what="a new serving certificate")
    status, _ = await post(plane, review())
    assert status == 200


async def test_given_certificate_files_are_reloaded_when_they_change(plane_factory: Any, tmp_path: Any) -> None:
    from meshplane.controlplane.ca import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"

    def write(name: str) -> None:
        issued = ca.server_certificate([name, "127.0.0.1"], dt.timedelta(hours=1))
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)

    write("first.example")
    plane = await plane_factory(ca_dir=tmp_path / "ca", webhook_cert=cert, webhook_key=key)

    async def served_name() -> str:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", plane.webhook_port, ssl=client_tls(plane), server_hostname="127.0.0.1"
        )
        subject = dict(x[0] for x in writer.get_extra_info("peercert")["subject"])
        writer.close()
        await writer.wait_closed()
        return str(subject["commonName"])

    assert await served_name() == "first.example"
    write("second.example")

    async def reloaded() -> bool:
        return await served_name() == "second.example"

    await wait_until(reloaded, timeout=8, interval=0.3, what="the new certificate files to be served")
