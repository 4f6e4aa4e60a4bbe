"""The Kubernetes manifests: valid for Kubernetes 1.30, least-privilege RBAC, a Deployment that runs what
`meshctl serve` accepts, highly available, and consistent with the Service, the webhook configuration
and the control plane image (top-level Dockerfile). No cluster runs here: this is what can be checked
without one."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshplane.controlplane.cli import _parser
from meshplane.webhook.registration import webhook_configuration

TOP = Path(__file__).parents[2]
DEPLOY = TOP / "deploy" / "kubernetes"
NAMESPACE = "mesh-system"
KUBERNETES_FLAGS = ("--kubernetes", "--ca-secret", "--webhook-configuration")

# Exactly the API calls the control plane makes: (role kind, namespace, apiGroup, resource, verb, resourceName).
EXPECTED_RBAC = {
    *(("ClusterRole", None, "", r, v, None) for r in ("services", "pods", "namespaces") for v in ("list", "watch")),
    *(("ClusterRole", None, "discovery.k8s.io", "endpointslices", v, None) for v in ("list", "watch")),
    ("ClusterRole", None, "authentication.k8s.io", "tokenreviews", "create", None),
    *(
        ("ClusterRole", None, "admissionregistration.k8s.io", "mutatingwebhookconfigurations", v, "WEBHOOK")
        for v in ("get", "patch")
    ),
    ("Role", NAMESPACE, "", "secrets", "get", "CA_SECRET"),
    ("Role", NAMESPACE, "", "secrets", "create", None),  # create cannot be limited by name
}


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def one(kind: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [d for d in docs or documents() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]  # type: ignore[no-any-return]


def serve_args() -> argparse.Namespace:
    """The Deployment's args as `meshctl` parses them (an unknown flag fails here, as in the pod)."""
    args = container()["args"]
    assert args[0] == "serve"
    try:
        return _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`meshctl {' '.join(args)}` does not parse (see the usage message above)")


def known_flags() -> set[str]:
    return {o for a in serve_parser()._actions for o in a.option_strings}


def require_kubernetes_flags() -> None:
    missing = [f for f in KUBERNETES_FLAGS if f not in known_flags()]
    if missing:
        pytest.xfail(f"`meshctl serve` does not have {missing} yet (Kubernetes mode is being written)")


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_are_valid(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_everything_the_control_plane_needs_is_there() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "MutatingWebhookConfiguration",
        ]
    )
    for doc in documents():
        if doc["kind"] not in {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
    assert one("Namespace")["metadata"]["name"] == NAMESPACE


def test_rbac_is_exactly_the_api_calls_the_control_plane_makes() -> None:
    require_kubernetes_flags()
    args = serve_args()
    secret_ns, _, secret = args.ca_secret.partition("/")
    names = {"WEBHOOK": args.webhook_configuration, "CA_SECRET": secret}
    expected = {(k, ns, g, r, v, names.get(n, n)) for k, ns, g, r, v, n in EXPECTED_RBAC}
    assert secret_ns == NAMESPACE, "the CA Secret lives in the control plane's own namespace"

    granted = set()
    for doc in documents():
        if doc["kind"] not in {"ClusterRole", "Role"}:
            continue
        assert "aggregationRule" not in doc
        for rule in doc["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule  # no nonResourceURLs
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert not any("*" in v for v in rule.get(field, [])), f"wildcard in {doc['kind']} {rule}"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            granted.add((doc["kind"], doc["metadata"].get("namespace"), group, resource, verb, name))
    assert granted == expected, f"missing: {expected - granted}; extra: {granted - expected}"


def test_the_roles_are_bound_to_the_control_planes_service_account() -> None:
    deployment = one("Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert one("ServiceAccount")["metadata"] == {
        "name": account,
        "namespace": NAMESPACE,
        "labels": {"app": "meshplane"},
    }
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding, role = one(binding_kind), one(role_kind)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        assert binding["metadata"].get("namespace") == role["metadata"].get("namespace")


def test_the_deployment_runs_what_meshctl_serve_accepts() -> None:
    require_kubernetes_flags()
    flags = [a for a in container()["args"] if a.startswith("-")]
    assert not set(flags) - known_flags(), f"unknown to `meshctl serve --help`: {set(flags) - known_flags()}"
    args = serve_args()
    assert args.command == "serve" and args.kubernetes
    assert not args.insecure_trust_node_metadata and "--xds-port" not in flags, "never the plaintext xDS port"
    assert not args.debug_from_anywhere
    assert args.ca_secret == f"{NAMESPACE}/meshplane-ca"
    # The configuration whose caBundle it patches is the one installed, and the one `meshctl webhook-config` prints.
    webhook = one("MutatingWebhookConfiguration")
    assert args.webhook_configuration == webhook["metadata"]["name"]
    assert (
        args.webhook_configuration
        == webhook_configuration(ca_bundle=b"", service="x", namespace="y")["metadata"]["name"]
    )
    # The sidecars it injects reach xDS through the Service's TLS port.
    service = one("Service")
    host, _, port = args.injected_xds_address.rpartition(":")
    assert host in {f"{service['metadata']['name']}.{NAMESPACE}.svc", f"{service['metadata']['name']}.{NAMESPACE}"}
    by_port = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert by_port[int(port)] == args.xds_tls_port
    # Its state (the CA root read from the Secret) lives in a writable volume: the root filesystem is read-only.
    mounts = {m["mountPath"] for m in container()["volumeMounts"] if not m.get("readOnly")}
    for path in (args.ca_dir, args.state_dir):
        assert any(Path(path).is_relative_to(m) for m in mounts), f"{path} is not on a writable volume"
    env = {e["name"]: e.get("valueFrom") for e in container()["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_the_service_and_ports_match_the_servers() -> None:
    require_kubernetes_flags()
    args = serve_args()
    service = one("Service")
    assert service["spec"]["selector"] == one("Deployment")["spec"]["selector"]["matchLabels"]
    ports = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert ports == {args.xds_tls_port: args.xds_tls_port, 443: args.webhook_port, args.admin_port: args.admin_port}
    declared = {p["containerPort"] for p in container()["ports"]}
    assert declared == {args.xds_tls_port, args.webhook_port, args.admin_port}
    assert len({p["name"] for p in service["spec"]["ports"]}) == len(ports)


def test_probes_resources_and_security_context() -> None:
    require_kubernetes_flags()
    args = serve_args()
    c = container()
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": args.admin_port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": args.admin_port}
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and "privileged" not in sc
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    # The uid is the image's own unprivileged user (top-level Dockerfile).
    user = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", (TOP / "Dockerfile").read_text(), re.M)[-1]
    assert str(pod["securityContext"]["runAsUser"]) == user[0]
    assert str(pod["securityContext"]["runAsGroup"]) == (user[1] or user[0])
    # The control plane is never injected itself.
    assert one("Deployment")["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"


def test_no_subpath_mounts_and_the_mesh_file_is_in_a_mounted_directory() -> None:
    for doc in documents():
        assert "subPath" not in yaml.safe_dump(doc), f"{doc['kind']} {doc['metadata']['name']} uses subPath"
    require_kubernetes_flags()
    args = serve_args()
    pod = one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container()["volumeMounts"]:
        assert mount["name"] in volumes
    if args.mesh is not None:
        (mount,) = [m for m in container()["volumeMounts"] if Path(args.mesh).parent == Path(m["mountPath"])]
        config_map = volumes[mount["name"]]["configMap"]["name"]
        data = [d for d in documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_map]
        assert len(data) == 1 and Path(args.mesh).name in data[0]["data"]
        yaml.safe_load(data[0]["data"][Path(args.mesh).name])


def test_two_replicas_spread_over_nodes_with_a_disruption_budget() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    terms = [t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and t["labelSelector"]["matchLabels"].items() <= labels.items()
        and t["labelSelector"]["matchLabels"]
        for t in terms
    )
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a rollout never takes a replica away before its successor is ready"
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("minAvailable") == 1 or pdb["spec"].get("maxUnavailable") == 1


def test_the_webhook_configuration_is_what_meshctl_prints_and_points_at_the_service() -> None:
    installed = one("MutatingWebhookConfiguration")
    service = one("Service")
    printed = webhook_configuration(ca_bundle=b"", service=service["metadata"]["name"], namespace=NAMESPACE)
    kubernetes_validate.validate(printed, "1.30", strict=True)
    assert installed == printed
    for hook in installed["webhooks"]:
        target = hook["clientConfig"]["service"]
        assert (target["name"], target["namespace"]) == (service["metadata"]["name"], NAMESPACE)
        assert target["port"] in {p["port"] for p in service["spec"]["ports"]}
        assert hook["clientConfig"]["caBundle"] == "", "a placeholder: the control plane patches in the trust bundle"
