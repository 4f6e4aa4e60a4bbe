"""The injector on a corpus of realistic pods: schema-valid results, patches that reproduce them,
and `meshctl inject` giving the same pod as the webhook."""

import copy
import json
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from meshplane.webhook.annotations import InvalidAnnotation, proxy_options
from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.inject import inject
from meshplane.webhook.manifests import inject_manifests
from meshplane.webhook.patch import diff, escape
from meshplane.webhook.review import ReviewError, parse
from tests.harness import MESH_ROOT

K8S = "1.30"


def make(name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **meta}, "spec": spec}


CORPUS: dict[str, dict[str, Any]] = {
    "bare": make("bare", {"containers": [{"name": "app", "image": "nginx"}]}),
    "everything-already-there": make(
        "full",
        {
            "serviceAccountName": "web",
            "securityContext": {"runAsNonRoot": True, "fsGroup": 2000},
            "initContainers": [{"name": "migrate", "image": "db-migrate", "command": ["migrate"]}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [
                {
                    "name": "web",
                    "image": "web:1",
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    "securityContext": {"allowPrivilegeEscalation": False},
                }
            ],
        },
        labels={"app": "web", "version": "v1"},
        annotations={"example.com/owner": "team~web/frontend", "a/b~c": "x"},
    ),
    "probes-of-each-kind": make(
        "probes",
        {
            "containers": [
                {
                    "name": "web",
                    "image": "web",
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "livenessProbe": {"httpGet": {"path": "/live", "port": "http"}, "periodSeconds": 5},
                    "readinessProbe": {"tcpSocket": {"port": 8080}},
                    "startupProbe": {"httpGet": {"path": "/start", "port": 8080, "scheme": "HTTPS"}},
                },
                {
                    "name": "grpc",
                    "image": "grpc",
                    "ports": [{"containerPort": 9000}],
                    "livenessProbe": {"grpc": {"port": 9000, "service": "health"}},
                    "readinessProbe": {"exec": {"command": ["true"]}},
                },
            ]
        },
    ),
    "several-containers": make(
        "multi",
        {
            "containers": [
                {"name": "a", "image": "a", "ports": [{"containerPort": 80}]},
                {"name": "b", "image": "b", "ports": [{"containerPort": 81, "name": "metrics"}]},
            ]
        },
        labels={"app": "multi"},
    ),
    "native-sidecar": make(
        "native",
        {
            "initContainers": [{"name": "setup", "image": "setup"}],
            "containers": [{"name": "job", "image": "job"}],
            "restartPolicy": "Never",
        },
        annotations={"sidecar.istio.io/nativeSidecar": "true"},
    ),
    "hold-application": make(
        "hold",
        {"containers": [{"name": "app", "image": "app"}]},
        annotations={"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"},
    ),
    "tuned-proxy": make(
        "tuned",
        {"containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}]},
        annotations={
            "sidecar.istio.io/proxyCPU": "250m",
            "sidecar.istio.io/proxyCPULimit": "1",
            "sidecar.istio.io/proxyMemory": "64Mi",
            "sidecar.istio.io/proxyMemoryLimit": "512Mi",
            "sidecar.istio.io/logLevel": "debug",
            "sidecar.istio.io/componentLogLevel": "upstream:trace",
            "sidecar.istio.io/proxyImage": "registry.example/proxy:custom",
            "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32",
            "traffic.sidecar.istio.io/includeInboundPorts": "8080",
            "traffic.sidecar.istio.io/excludeInboundPorts": "9901",
            "traffic.sidecar.istio.io/excludeInterfaces": "net1",
        },
    ),
    "no-rewrite": make(
        "plain",
        {"containers": [{"name": "app", "image": "app", "livenessProbe": {"httpGet": {"path": "/", "port": 80}}}]},
        annotations={"sidecar.istio.io/rewriteAppHTTPProbers": "false"},
    ),
}


@pytest.fixture(params=sorted(CORPUS))
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, CORPUS[request.param]


def test_injected_pods_are_valid_and_patches_reproduce_them(case: tuple[str, dict[str, Any]]) -> None:
    name, pod = case
    original = copy.deepcopy(pod)
    outcome = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT))
    assert pod == original, "the input pod must not be modified"
    assert outcome.decision.inject and outcome.error is None
    kubernetes_validate.validate(outcome.pod, K8S, strict=True)
    assert jsonpatch.apply_patch(original, outcome.patch) == outcome.pod
    in_shop = copy.deepcopy(original)
    in_shop["metadata"]["namespace"] = "shop"  # where the webhook was told the pod is
    manifest, _ = inject_manifests(yaml.safe_dump(in_shop), InjectionConfig(xds_ca=MESH_ROOT))
    expected = copy.deepcopy(outcome.pod)
    expected["metadata"]["namespace"] = "shop"
    assert yaml.safe_load(manifest) == expected, f"meshctl inject and the webhook differ for {name}"


def test_what_is_injected(case: tuple[str, dict[str, Any]]) -> None:
    _, pod = case
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    spec, meta = out["spec"], out["metadata"]
    init = spec["initContainers"][0]
    assert init["name"] == "mesh-init" and init["command"] == ["meshctl"] and init["args"][0] == "iptables"
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert init["securityContext"]["runAsUser"] == 0
    containers = spec["containers"] + spec["initContainers"]
    proxy = next(c for c in containers if c["name"] == "mesh-proxy")
    sc = proxy["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"]) == (
        1337,
        1337,
        True,
        False,
    )
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert {"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"} in proxy["ports"]
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    assert bootstrap["node"]["id"] == "sidecar~$(INSTANCE_IP)~$(POD_NAME).shop~shop.svc.cluster.local"
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in proxy["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["INSTANCE_IP"] == "status.podIP"
    assert meta["labels"]["security.istio.io/tlsMode"] == "istio"
    status = json.loads(meta["annotations"]["sidecar.istio.io/status"])
    assert "mesh-init" in status["initContainers"]
    assert inject(out, "shop", InjectionConfig(xds_ca=MESH_ROOT)).decision.reason.startswith("already injected")


def test_native_sidecar_placement() -> None:
    out = inject(CORPUS["native-sidecar"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["mesh-init", "mesh-proxy", "setup"]
    proxy = out["spec"]["initContainers"][1]
    assert proxy["restartPolicy"] == "Always" and proxy["startupProbe"]["httpGet"]["port"] == 15021
    assert [c["name"] for c in out["spec"]["containers"]] == ["job"]


def test_hold_application_puts_the_proxy_first_and_waits() -> None:
    out = inject(CORPUS["hold-application"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    first = out["spec"]["containers"][0]
    assert first["name"] == "mesh-proxy"
    assert first["lifecycle"]["postStart"]["exec"]["command"][:2] == ["meshctl", "wait"]
    default = inject(CORPUS["bare"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    assert default["spec"]["containers"][-1]["name"] == "mesh-proxy"


def test_probes_are_rewritten_and_kept_for_the_proxy() -> None:
    out = inject(CORPUS["probes-of-each-kind"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    web, grpc = out["spec"]["containers"][:2]
    assert web["livenessProbe"] == {
        "httpGet": {"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"},
        "periodSeconds": 5,
    }
    assert web["readinessProbe"]["httpGet"]["path"] == "/app-health/web/readyz"
    assert web["startupProbe"]["httpGet"]["path"] == "/app-health/web/startupz"
    assert grpc["livenessProbe"]["httpGet"]["path"] == "/app-health/grpc/livez"
    assert grpc["readinessProbe"] == {"exec": {"command": ["true"]}}  # exec probes stay
    proxy = out["spec"]["containers"][-1]
    kept = json.loads(next(e["value"] for e in proxy["env"] if e["name"] == "MESH_KUBE_APP_PROBERS"))
    assert kept["/app-health/web/livez"] == {"httpGet": {"path": "/live", "port": "http"}}
    assert kept["/app-health/grpc/livez"] == {"grpc": {"port": 9000, "service": "health"}}
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    clusters = {c["name"]: c for c in bootstrap["staticResources"]["clusters"]}
    assert clusters["probe|app-health|web|livez"]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"][
        "address"
    ]["socketAddress"] == {"address": "127.0.0.1", "portValue": 8080}
    assert "tcpHealthCheck" in clusters["probe|app-health|web|readyz"]["healthChecks"][0]
    assert clusters["probe|app-health|grpc|livez"]["healthChecks"][0]["grpcHealthCheck"] == {"serviceName": "health"}
    plain = inject(CORPUS["no-rewrite"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    assert plain["spec"]["containers"][0]["livenessProbe"] == {"httpGet": {"path": "/", "port": 80}}


def test_annotations_shape_the_proxy_and_the_capture() -> None:
    out = inject(CORPUS["tuned-proxy"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    proxy = out["spec"]["containers"][-1]
    assert proxy["image"] == "registry.example/proxy:custom"
    assert proxy["resources"] == {
        "requests": {"cpu": "250m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }
    assert proxy["args"][proxy["args"].index("--log-level") + 1] == "debug"
    assert proxy["args"][proxy["args"].index("--component-log-level") + 1] == "upstream:trace"
    args = out["spec"]["initContainers"][0]["args"]
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags == {
        "-p": "15001",
        "-z": "15006",
        "-u": "1337",
        "-g": "1337",
        "-b": "8080",
        "-d": "15090,15021,15020,9901",
        "-i": "*",
        "-x": "169.254.169.254/32",
        "-o": "5432,6379",
        "-c": "net1",
    }


def _capture_flags(pod: dict[str, Any]) -> dict[str, str]:
    args = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod["spec"]["initContainers"][0]["args"]
    return dict(zip(args[1::2], args[2::2], strict=True))


@pytest.mark.parametrize("name", ["several-containers", "bare", "everything-already-there"])
def test_every_inbound_port_is_captured_by_default_not_only_declared_ones(name: str) -> None:
    """As Istio: `-b '*'` with the proxy's own ports excluded; declared ports do not narrow the capture
    (an app listening on an undeclared port would otherwise be reachable in plaintext under STRICT)."""
    flags = _capture_flags(CORPUS[name])
    assert (flags["-b"], flags["-d"]) == ("*", "15090,15021,15020")


@pytest.mark.parametrize(
    ("annotations", "b", "d"),
    [
        ({"traffic.sidecar.istio.io/includeInboundPorts": "8080, 9090"}, "8080,9090", "15090,15021,15020"),
        ({"traffic.sidecar.istio.io/includeInboundPorts": "*"}, "*", "15090,15021,15020"),
        ({"traffic.sidecar.istio.io/includeInboundPorts": ""}, "", "15090,15021,15020"),
        ({"traffic.sidecar.istio.io/excludeInboundPorts": "9901,15021"}, "*", "15090,15021,15020,9901"),
    ],
)
def test_inbound_capture_annotations_narrow_it_as_in_istio(annotations: dict[str, str], b: str, d: str) -> None:
    pod = make("p", {"containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 80}]}]})
    pod["metadata"]["annotations"] = annotations
    flags = _capture_flags(pod)
    assert (flags["-b"], flags["-d"]) == (b, d)


def _proxy(out: dict[str, Any]) -> dict[str, Any]:
    return next(
        c for c in out["spec"]["containers"] + out["spec"].get("initContainers", []) if c["name"] == "mesh-proxy"
    )


def test_the_proxy_drains_before_it_is_stopped() -> None:
    out = inject(CORPUS["bare"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    proxy = _proxy(out)
    assert proxy["lifecycle"]["preStop"] == {"exec": {"command": ["meshctl", "drain", "--duration", "5s"]}}
    assert proxy["args"][proxy["args"].index("--drain-time-s") + 1] == "5"
    assert "terminationGracePeriodSeconds" not in out["spec"]  # Kubernetes' 30 s leave room for 5 s

    hold = inject(CORPUS["hold-application"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    assert set(_proxy(hold)["lifecycle"]) == {"postStart", "preStop"}


@pytest.mark.parametrize(
    ("config", "grace", "drain", "expected_grace"),
    [
        ("terminationDrainDuration: 20s", None, "20s", 30),
        ("terminationDrainDuration: 40s", None, "40s", 45),
        ("terminationDrainDuration: 1500ms", 3, "1.5s", 7),
        ("{terminationDrainDuration: 2m, holdApplicationUntilProxyStarts: false}", 600, "120s", 600),
    ],
)
def test_termination_drain_duration_and_the_grace_period_leave_room(
    config: str, grace: int | None, drain: str, expected_grace: int
) -> None:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "app"}]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    out = inject(
        make("d", spec, annotations={"proxy.istio.io/config": config}), "shop", InjectionConfig(xds_ca=MESH_ROOT)
    ).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    assert _proxy(out)["lifecycle"]["preStop"]["exec"]["command"][-1] == drain
    assert out["spec"].get("terminationGracePeriodSeconds", 30) == expected_grace


def test_admin_socket_option_puts_the_admin_api_in_an_empty_dir() -> None:
    config = InjectionConfig(
        xds_ca=MESH_ROOT, admin_socket="/run/meshplane-admin/admin.sock", xds_address="unix:/run/mp/xds.sock"
    )
    out = inject(CORPUS["everything-already-there"], "shop", config).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    proxy = _proxy(out)
    assert proxy["volumeMounts"][-1] == {"name": "mesh-admin", "mountPath": "/run/meshplane-admin"}
    assert {"name": "mesh-admin", "emptyDir": {"medium": "Memory"}} in out["spec"]["volumes"]
    assert {"name": "data", "emptyDir": {}} in out["spec"]["volumes"]
    assert proxy["lifecycle"]["preStop"]["exec"]["command"][-2:] == [
        "--admin-socket",
        "/run/meshplane-admin/admin.sock",
    ]
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    assert bootstrap["admin"]["address"]["pipe"]["path"] == "/run/meshplane-admin/admin.sock"
    assert "mesh-admin" not in {
        m["name"] for m in _proxy(inject(CORPUS["bare"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod)["volumeMounts"]
    }


def test_an_annotation_makes_the_proxy_fetch_clusters_on_demand() -> None:
    def bootstrap_of(pod: dict[str, Any]) -> dict[str, Any]:
        proxy = _proxy(inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod)
        return dict(json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1]))

    annotated = copy.deepcopy(CORPUS["bare"])
    annotated["metadata"].setdefault("annotations", {})["sidecar.meshplane.io/onDemandClusters"] = "true"
    on_demand = bootstrap_of(annotated)
    assert "cdsConfig" not in on_demand["dynamicResources"] and "ldsConfig" in on_demand["dynamicResources"]
    assert on_demand["node"]["metadata"]["ON_DEMAND_CLUSTERS"] == "true"
    plain = bootstrap_of(CORPUS["bare"])
    assert "cdsConfig" in plain["dynamicResources"] and "ON_DEMAND_CLUSTERS" not in plain["node"]["metadata"]
    annotated["metadata"]["annotations"]["sidecar.meshplane.io/onDemandClusters"] = "sometimes"
    with pytest.raises(InvalidAnnotation, match="onDemandClusters"):
        proxy_options(annotated["metadata"]["annotations"], InjectionConfig(xds_ca=MESH_ROOT))


@pytest.mark.parametrize("xds", ["meshplane.mesh-system.svc:15012", "unix:/x.sock"])
def test_the_proxy_proves_its_identity_with_a_projected_token(xds: str) -> None:
    """Stock Envoy sends the pod's projected service-account token on every xDS connection (over TLS
    verified against the mesh roots carried inline in its bootstrap, or a unix socket), as Istio's
    istio-token volume; no ConfigMap has to be published into the namespace."""
    out = inject(CORPUS["bare"], "shop", InjectionConfig(xds_ca=MESH_ROOT, xds_address=xds)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "meshplane", "expirationSeconds": 43200, "path": "istio-token"}
    mounts = {m["name"]: m["mountPath"] for m in _proxy(out)["volumeMounts"]}
    assert mounts == {"istio-token": "/var/run/secrets/tokens"}
    proxy = _proxy(out)
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    google = bootstrap["dynamicResources"]["adsConfig"]["grpcServices"][0]["googleGrpc"]
    plugin = google["callCredentials"][0]["fromPlugin"]["typedConfig"]
    assert plugin["secretData"] == {"filename": "/var/run/secrets/tokens/istio-token"}
    channel = google["channelCredentials"]
    tls = {"sslCredentials": {"rootCerts": {"inlineString": MESH_ROOT}}}
    assert channel == (tls if xds.startswith("meshplane") else {"localCredentials": {}})


def test_without_the_mesh_roots_a_tcp_control_plane_is_a_clear_deny() -> None:
    outcome = inject(CORPUS["bare"], "shop", InjectionConfig())
    assert outcome.error is not None and "mesh root" in str(outcome.error)


@pytest.mark.parametrize(
    ("annotation", "value", "accepted"),
    [
        ("sidecar.istio.io/proxyCPU", "lots", "a Kubernetes quantity"),
        ("sidecar.istio.io/proxyMemoryLimit", "1 GB", "a Kubernetes quantity"),
        ("sidecar.istio.io/logLevel", "loud", "trace | debug"),
        ("sidecar.istio.io/componentLogLevel", "upstream", "component:level pairs"),
        ("sidecar.istio.io/nativeSidecar", "maybe", "true or false"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "5432,postgres", "comma-separated port numbers"),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/33", "comma-separated IP ranges"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth0;reboot", "interface names"),
        ("proxy.istio.io/config", "[1, 2]", "ProxyConfig mapping"),
        ("proxy.istio.io/config", "terminationDrainDuration: soon", "terminationDrainDuration as a duration"),
        ("proxy.istio.io/config", "terminationDrainDuration: 2h", "terminationDrainDuration as a duration"),
    ],
)
def test_invalid_annotations_deny_with_the_name_and_accepted_forms(annotation: str, value: str, accepted: str) -> None:
    pod = make("bad", {"containers": [{"name": "app", "image": "app"}]}, annotations={annotation: value})
    outcome = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT))
    assert outcome.error is not None and outcome.patch == []
    assert annotation in str(outcome.error) and accepted in str(outcome.error)
    ignored = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT, ignore_invalid_annotations=True))
    assert ignored.error is None and ignored.patch
    with pytest.raises(InvalidAnnotation):
        proxy_options({annotation: value}, InjectionConfig(xds_ca=MESH_ROOT))


def test_patch_paths_are_escaped() -> None:
    assert escape("a/b~c") == "a~1b~0c"
    original = {"metadata": {"annotations": {"x": "1"}}}
    mutated = {"metadata": {"annotations": {"x": "1", "sidecar.istio.io/status": "{}", "a~b/c": "2"}}}
    ops = diff(original, mutated)
    assert {op["path"] for op in ops} == {
        "/metadata/annotations/sidecar.istio.io~1status",
        "/metadata/annotations/a~0b~1c",
    }
    assert jsonpatch.apply_patch(original, ops) == mutated


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1]", "not an AdmissionReview object"),
        (b'{"kind": "Pod"}', "kind must be AdmissionReview"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1"}', "apiVersion must be"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', "request is missing"),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"kind": {"kind": "Pod"}}}',
            "request.uid is missing",
        ),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": "1", '
            b'"kind": {"group": "apps", "kind": "Deployment"}}}',
            "injects Pods, got kind 'Deployment'",
        ),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": "1", '
            b'"kind": {"kind": "Pod"}}}',
            "request.object is missing",
        ),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": "1", '
            b'"kind": {"kind": "Pod"}, "object": {"spec": {}}}}',
            "no spec.containers",
        ),
    ],
)
def test_bad_reviews(body: bytes, message: str) -> None:
    with pytest.raises(ReviewError, match=message):
        parse(body)


def test_interception_mode_none_has_no_capture() -> None:
    pod = make(
        "n", {"containers": [{"name": "app", "image": "a"}]}, annotations={"sidecar.istio.io/interceptionMode": "NONE"}
    )
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    assert "initContainers" not in out["spec"] and _proxy(out)
    assert not json.loads(out["metadata"]["annotations"]["sidecar.istio.io/status"]).get("initContainers")
    bogus = make("b", {"containers": [{"name": "app", "image": "a"}]}, annotations={INTERCEPTION: "tproxy"})
    error = inject(bogus, "shop", InjectionConfig(xds_ca=MESH_ROOT)).error
    assert error is not None and "REDIRECT, TPROXY or NONE" in str(error)


INTERCEPTION = "sidecar.istio.io/interceptionMode"


def test_interception_mode_tproxy_captures_with_tproxy_and_lets_the_proxy_bind_clients_addresses() -> None:
    spec = {"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 8080}]}]}
    out = inject(make("t", spec, annotations={INTERCEPTION: "TPROXY"}), "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    init = out["spec"]["initContainers"][0]
    args = init["args"]
    assert args[args.index("-m") + 1] == "TPROXY" and args[args.index("-u") + 1] == "1337"
    proxy = _proxy(out)
    # As Istio's template: root for the capability to take effect, group 1337 to stay uncaptured.
    assert proxy["securityContext"] == {
        "runAsUser": 0,
        "runAsGroup": 1337,
        "runAsNonRoot": False,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
    }
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    assert bootstrap["node"]["metadata"]["INTERCEPTION_MODE"] == "TPROXY"
    # REDIRECT pods are as before: no -m, no capability, no metadata key.
    plain = _proxy(inject(make("r", spec), "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod)
    assert plain["securityContext"]["runAsUser"] == 1337 and plain["securityContext"]["capabilities"] == {
        "drop": ["ALL"]
    }
    assert (
        "INTERCEPTION_MODE"
        not in json.loads(plain["args"][plain["args"].index("--config-yaml") + 1])["node"]["metadata"]
    )


@pytest.mark.parametrize("templates", ["grpc-agent", "grpc-simple", "sidecar,grpc-agent", "sidecar,gateway", "custom"])
def test_templates_meshplane_does_not_have_are_a_clear_deny(templates: str) -> None:
    pod = make(
        "g", {"containers": [{"name": "app", "image": "a"}]}, annotations={"inject.istio.io/templates": templates}
    )
    error = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).error
    assert error is not None and "inject.istio.io/templates" in str(error) and templates in str(error)


def test_canonical_labels_are_derived_as_istio_does_and_a_user_tls_mode_is_kept() -> None:
    deployment_pod = make(
        "reviews-v1-7d9c8f6b5-x2x9q",
        {"containers": [{"name": "app", "image": "a"}]},
        generateName="reviews-v1-7d9c8f6b5-",
        labels={"pod-template-hash": "7d9c8f6b5", "version": "v1", "security.istio.io/tlsMode": "disabled"},
    )
    labels = inject(deployment_pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod["metadata"]["labels"]
    assert labels["service.istio.io/canonical-name"] == "reviews-v1"
    assert labels["service.istio.io/canonical-revision"] == "v1"
    assert labels["security.istio.io/tlsMode"] == "disabled"
    app = make("x", {"containers": [{"name": "app", "image": "a"}]}, labels={"app": "ratings"})
    labels = inject(app, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod["metadata"]["labels"]
    assert (labels["service.istio.io/canonical-name"], labels["service.istio.io/canonical-revision"]) == (
        "ratings",
        "latest",
    )


def test_a_proxy_request_above_its_limit_is_a_clear_deny() -> None:
    annotations = {"sidecar.istio.io/proxyMemory": "2Gi", "sidecar.istio.io/proxyMemoryLimit": "1Gi"}
    pod = make("r", {"containers": [{"name": "app", "image": "a"}]}, annotations=annotations)
    error = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).error
    assert error is not None and "proxyMemory" in str(error) and "limit" in str(error)
    ok = {"sidecar.istio.io/proxyCPU": "500m", "sidecar.istio.io/proxyCPULimit": "1"}
    pod = make("ok", {"containers": [{"name": "app", "image": "a"}]}, annotations=ok)
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    assert _proxy(out)["resources"]["requests"]["cpu"] == "500m"


# Migration from Istio. The un-injected Deployment, and the same one as Istio 1.22's injector
# (`istioctl kube-inject`, or the webhook on its pods) leaves it, written by hand in that shape.
PLAIN_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews
  namespace: shop
  labels: {app: reviews}
spec:
  replicas: 2
  selector:
    matchLabels: {app: reviews, version: v1}
  template:
    metadata:
      labels: {app: reviews, version: v1}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: "9080"
        prometheus.io/path: /metrics
    spec:
      serviceAccountName: reviews
      volumes:
      - name: tmp
        emptyDir: {}
      containers:
      - name: reviews
        image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.1
        ports:
        - containerPort: 9080
        livenessProbe:
          httpGet: {path: /health, port: 9080}
          periodSeconds: 10
        readinessProbe:
          tcpSocket: {port: 9080}
          initialDelaySeconds: 5
        volumeMounts:
        - name: tmp
          mountPath: /tmp
"""

ISTIO_STATUS = json.dumps(
    {
        "initContainers": ["istio-init"],
        "containers": ["istio-proxy"],
        "volumes": [
            "workload-socket",
            "credential-socket",
            "workload-certs",
            "istio-envoy",
            "istio-data",
            "istio-podinfo",
            "istio-token",
            "istiod-ca-cert",
        ],
        "imagePullSecrets": None,
        "revision": "default",
    },
    separators=(",", ":"),
)
ISTIO_PROBERS = json.dumps(
    {
        "/app-health/reviews/livez": {"httpGet": {"path": "/health", "port": 9080}, "timeoutSeconds": 1},
        "/app-health/reviews/readyz": {"tcpSocket": {"port": 9080}, "timeoutSeconds": 1},
    },
    separators=(",", ":"),
)

ISTIO_DEPLOYMENT = f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  creationTimestamp: null
  name: reviews
  namespace: shop
  labels: {{app: reviews}}
spec:
  replicas: 2
  selector:
    matchLabels: {{app: reviews, version: v1}}
  strategy: {{}}
  template:
    metadata:
      annotations:
        istio.io/rev: default
        kubectl.kubernetes.io/default-container: reviews
        kubectl.kubernetes.io/default-logs-container: reviews
        prometheus.io/path: /stats/prometheus
        prometheus.io/port: "15020"
        prometheus.io/scrape: "true"
        sidecar.istio.io/status: '{ISTIO_STATUS}'
      creationTimestamp: null
      labels:
        app: reviews
        security.istio.io/tlsMode: istio
        service.istio.io/canonical-name: reviews
        service.istio.io/canonical-revision: v1
        version: v1
    spec:
      serviceAccountName: reviews
      containers:
      - name: reviews
        image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.1
        ports:
        - containerPort: 9080
        livenessProbe:
          httpGet: {{path: /app-health/reviews/livez, port: 15020, scheme: HTTP}}
          periodSeconds: 10
        readinessProbe:
          httpGet: {{path: /app-health/reviews/readyz, port: 15020, scheme: HTTP}}
          initialDelaySeconds: 5
        volumeMounts:
        - name: tmp
          mountPath: /tmp
      - name: istio-proxy
        image: docker.io/istio/proxyv2:1.22.0
        args: [proxy, sidecar, --domain, $(POD_NAMESPACE).svc.cluster.local, --proxyLogLevel=warning,
               --proxyComponentLogLevel=misc:error, --log_output_level=default:info]
        env:
        - name: PILOT_CERT_PROVIDER
          value: istiod
        - name: CA_ADDR
          value: istiod.istio-system.svc:15012
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        - name: POD_NAMESPACE
          valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
        - name: INSTANCE_IP
          valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
        - name: ISTIO_META_APP_CONTAINERS
          value: reviews
        - name: ISTIO_META_WORKLOAD_NAME
          value: reviews
        - name: ISTIO_PROMETHEUS_ANNOTATIONS
          value: '{{"scrape":"true","path":"/metrics","port":"9080"}}'
        - name: ISTIO_KUBE_APP_PROBERS
          value: '{ISTIO_PROBERS}'
        ports:
        - {{containerPort: 15090, name: http-envoy-prom, protocol: TCP}}
        readinessProbe:
          failureThreshold: 4
          httpGet: {{path: /healthz/ready, port: 15021}}
          periodSeconds: 15
          timeoutSeconds: 3
        resources:
          limits: {{cpu: "2", memory: 1Gi}}
          requests: {{cpu: 100m, memory: 128Mi}}
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {{drop: [ALL]}}
          privileged: false
          readOnlyRootFilesystem: true
          runAsGroup: 1337
          runAsNonRoot: true
          runAsUser: 1337
        volumeMounts:
        - {{mountPath: /var/run/secrets/workload-spiffe-uds, name: workload-socket}}
        - {{mountPath: /var/run/secrets/credential-uds, name: credential-socket}}
        - {{mountPath: /var/run/secrets/workload-spiffe-credentials, name: workload-certs}}
        - {{mountPath: /var/run/secrets/istio, name: istiod-ca-cert}}
        - {{mountPath: /var/lib/istio/data, name: istio-data}}
        - {{mountPath: /etc/istio/proxy, name: istio-envoy}}
        - {{mountPath: /var/run/secrets/tokens, name: istio-token}}
        - {{mountPath: /etc/istio/pod, name: istio-podinfo}}
      initContainers:
      - name: istio-init
        image: docker.io/istio/proxyv2:1.22.0
        args: [istio-iptables, -p, "15001", -z, "15006", -u, "1337", -m, REDIRECT, -i, '*', -x, "", -b, '*',
               -d, "15090,15021,15020", --log_output_level=default:info]
        resources:
          limits: {{cpu: "2", memory: 1Gi}}
          requests: {{cpu: 100m, memory: 128Mi}}
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {{add: [NET_ADMIN, NET_RAW], drop: [ALL]}}
          privileged: false
          readOnlyRootFilesystem: false
          runAsGroup: 0
          runAsNonRoot: false
          runAsUser: 0
      volumes:
      - name: workload-socket
        emptyDir: {{}}
      - name: credential-socket
        emptyDir: {{}}
      - name: workload-certs
        emptyDir: {{}}
      - name: istio-envoy
        emptyDir: {{medium: Memory}}
      - name: istio-data
        emptyDir: {{}}
      - name: istio-podinfo
        downwardAPI:
          items:
          - {{fieldRef: {{fieldPath: metadata.labels}}, path: labels}}
          - {{fieldRef: {{fieldPath: metadata.annotations}}, path: annotations}}
      - name: istio-token
        projected:
          sources:
          - serviceAccountToken: {{audience: istio-ca, expirationSeconds: 43200, path: istio-token}}
      - name: istiod-ca-cert
        configMap: {{name: istio-ca-root-cert}}
      - name: tmp
        emptyDir: {{}}
status: {{}}
"""


def _pod_of(deployment: str) -> dict[str, Any]:
    """The pod the Deployment's ReplicaSet creates, as the webhook receives it."""
    template = yaml.safe_load(deployment)["spec"]["template"]
    meta = {k: v for k, v in template["metadata"].items() if k != "creationTimestamp"}
    meta["labels"] = {**meta["labels"], "pod-template-hash": "7d9f8c6b5"}
    meta |= {"generateName": "reviews-7d9f8c6b5-", "namespace": "shop"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}


def test_a_pod_istio_injected_is_uninjected_then_injected_by_the_webhook() -> None:
    config = InjectionConfig(xds_ca=MESH_ROOT)
    istio, plain = _pod_of(ISTIO_DEPLOYMENT), _pod_of(PLAIN_DEPLOYMENT)
    original = copy.deepcopy(istio)
    outcome = inject(istio, "shop", config)
    assert istio == original, "the input pod must not be modified"
    assert outcome.decision.inject and outcome.error is None
    assert "Istio's sidecar" in outcome.decision.reason
    assert outcome.pod == inject(plain, "shop", config).pod
    kubernetes_validate.validate(outcome.pod, K8S, strict=True)
    assert jsonpatch.apply_patch(original, outcome.patch) == outcome.pod
    spec = outcome.pod["spec"]
    names = [c["name"] for c in spec["containers"] + spec["initContainers"]]
    assert names == ["reviews", "mesh-proxy", "mesh-init"] and not any("istio" in n for n in names)
    assert [v["name"] for v in spec["volumes"]] == ["tmp", "istio-token"]
    annotations = outcome.pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9080" and annotations["prometheus.io/path"] == "/metrics"
    assert "istio.io/rev" not in annotations and "kubectl.kubernetes.io/default-container" not in annotations
    assert json.loads(annotations["sidecar.istio.io/status"])["containers"] == ["mesh-proxy"]
    # ...and Meshplane's own injection is not undone: injecting the result again does nothing.
    again = inject(outcome.pod, "shop", config)
    assert not again.decision.inject and again.patch == []


def test_meshctl_inject_moves_an_istio_injected_deployment_over() -> None:
    config = InjectionConfig(xds_ca=MESH_ROOT)
    migrated, report = inject_manifests(ISTIO_DEPLOYMENT, config)
    fresh, _ = inject_manifests(PLAIN_DEPLOYMENT, config)
    got, want = yaml.safe_load(migrated), yaml.safe_load(fresh)
    assert got["spec"]["template"] == want["spec"]["template"]
    assert report == [
        "Deployment shop/reviews: injected (the default policy is enabled; Istio's sidecar "
        "(sidecar.istio.io/status) replaced)"
    ]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "r", **got["spec"]["template"]["metadata"]}}
    kubernetes_validate.validate({**pod, "spec": got["spec"]["template"]["spec"]}, K8S, strict=True)


def test_istio_native_sidecars_and_a_user_label_value_are_handled_in_migration() -> None:
    pod = _pod_of(ISTIO_DEPLOYMENT)
    spec, labels = pod["spec"], pod["metadata"]["labels"]
    proxy = spec["containers"].pop()
    spec["initContainers"].append({**proxy, "restartPolicy": "Always"})  # Istio's native sidecar shape
    status = json.loads(pod["metadata"]["annotations"]["sidecar.istio.io/status"])
    status |= {"initContainers": ["istio-init", "istio-proxy"], "containers": None}
    pod["metadata"]["annotations"]["sidecar.istio.io/status"] = json.dumps(status)
    labels["service.istio.io/canonical-name"] = "reviews-team"  # the user's, not derived: kept
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    names = [c["name"] for c in out["spec"]["containers"] + out["spec"]["initContainers"]]
    assert names == ["reviews", "mesh-proxy", "mesh-init"]
    assert out["metadata"]["labels"]["service.istio.io/canonical-name"] == "reviews-team"
    assert out["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/app-health/reviews/livez"
    assert out["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] == 15020


@pytest.mark.parametrize(
    "status",
    [
        "{}",
        "not json",
        '{"initContainers":["mesh-init"],"containers":["mesh-proxy"],"volumes":["istio-token"]}',
        '{"containers":["istio-proxy","mesh-proxy"]}',
    ],
)
def test_a_status_not_written_by_istio_means_already_injected(status: str) -> None:
    pod = make("p", {"containers": [{"name": "app", "image": "app"}]}, annotations={"sidecar.istio.io/status": status})
    outcome = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT))
    assert not outcome.decision.inject and outcome.patch == [] and outcome.pod is pod
    assert outcome.decision.reason.startswith("already injected")


def test_an_istio_injected_pod_this_control_plane_must_not_inject_is_left_alone() -> None:
    pod = _pod_of(ISTIO_DEPLOYMENT)
    pod["metadata"]["labels"]["sidecar.istio.io/inject"] = "false"
    outcome = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT))
    assert not outcome.decision.inject and outcome.patch == [] and outcome.pod is pod


@pytest.mark.parametrize("proxy_name", ["istio-proxy", "mesh-proxy"])
def test_a_container_named_like_the_proxy_is_an_override_merged_into_it(proxy_name: str) -> None:
    override = {
        "name": proxy_name,
        "image": "registry.example/envoy:debug",
        "args": ["--config-yaml", "{}", "--log-level", "trace"],
        "env": [{"name": "POD_NAME", "value": "fixed"}, {"name": "EXTRA", "value": "1"}],
        "resources": {"limits": {"memory": "2Gi"}},
        "securityContext": {"runAsUser": 1500, "runAsGroup": 1501},
    }
    init_override = {"name": "istio-init", "image": "registry.example/init:1", "resources": {"limits": {"cpu": "1"}}}
    pod = make("o", {"initContainers": [init_override], "containers": [{"name": "app", "image": "app"}, override]})
    original = copy.deepcopy(pod)
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    assert pod == original
    kubernetes_validate.validate(out, K8S, strict=True)
    spec = out["spec"]
    assert [c["name"] for c in spec["containers"]] == ["app", "mesh-proxy"]
    assert [c["name"] for c in spec["initContainers"]] == ["mesh-init"]
    proxy, init = spec["containers"][1], spec["initContainers"][0]
    assert proxy["image"] == "registry.example/envoy:debug"
    assert proxy["args"] == ["--config-yaml", "{}", "--log-level", "trace"]  # args are replaced, as Istio
    env = {e["name"]: e for e in proxy["env"]}
    assert env["POD_NAME"] == {"name": "POD_NAME", "value": "fixed"} and env["EXTRA"]["value"] == "1"
    assert "INSTANCE_IP" in env  # merged by name: the injected variables stay
    assert proxy["resources"]["limits"]["memory"] == "2Gi" and proxy["resources"]["requests"]["cpu"]
    sc = proxy["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["readOnlyRootFilesystem"]) == (1500, 1501, True)
    flags = dict(zip(init["args"][1::2], init["args"][2::2], strict=True))
    assert (flags["-u"], flags["-g"]) == ("1500", "1501")  # the capture follows the proxy's user, as Istio
    assert init["image"] == "registry.example/init:1" and init["resources"]["limits"] == {"cpu": "1", "memory": "64Mi"}
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]


def test_proxy_overrides_with_native_sidecars_and_image_auto() -> None:
    pod = make(
        "n",
        {
            "containers": [
                {"name": "app", "image": "app"},
                {"name": "istio-proxy", "image": "auto", "env": [{"name": "A", "value": "1"}]},
                {"name": "mesh-proxy", "image": "auto", "env": [{"name": "A", "value": "2"}]},
            ]
        },
        annotations={"sidecar.istio.io/nativeSidecar": "true", "sidecar.istio.io/proxyImage": "proxy:2"},
    )
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    assert [c["name"] for c in out["spec"]["containers"]] == ["app"]
    proxy = out["spec"]["initContainers"][1]
    assert proxy["name"] == "mesh-proxy" and proxy["image"] == "proxy:2" and proxy["restartPolicy"] == "Always"
    assert {e["name"]: e.get("value") for e in proxy["env"]}["A"] == "2"  # Meshplane's own name wins


def test_a_probe_override_replaces_the_handler() -> None:
    probe = {"exec": {"command": ["true"]}, "periodSeconds": 7}
    pod = make("p", {"containers": [{"name": "app", "image": "app"}, {"name": "mesh-proxy", "readinessProbe": probe}]})
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    ready = out["spec"]["containers"][-1]["readinessProbe"]
    assert ready["exec"] == {"command": ["true"]} and "httpGet" not in ready and ready["periodSeconds"] == 7


def test_the_status_port_annotation_moves_the_app_health_and_metrics_port() -> None:
    pod = copy.deepcopy(CORPUS["probes-of-each-kind"])
    pod["metadata"]["annotations"] = {"status.sidecar.istio.io/port": "15030"}
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    proxy = _proxy(out)
    # As Istio: the proxy's own readiness stays on 15021; the app's probes and metrics move.
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert out["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] == 15030
    assert out["metadata"]["annotations"]["prometheus.io/port"] == "15030"
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    ports = {
        listener["name"]: listener["address"]["socketAddress"]["portValue"]
        for listener in bootstrap["staticResources"]["listeners"]
    }
    assert ports == {"prometheus": 15090, "health": 15021, "status": 15030}
    assert _capture_flags(pod)["-d"] == "15090,15021,15020,15030"


def test_istio_ports_serve_what_istio_serves_there() -> None:
    out = inject(CORPUS["probes-of-each-kind"], "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    proxy = _proxy(out)
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    routes = {}
    for listener in bootstrap["staticResources"]["listeners"]:
        manager = listener["filterChains"][0]["filters"][0]["typedConfig"]
        port = listener["address"]["socketAddress"]["portValue"]
        routes[port] = {r["match"]["path"] for r in manager["routeConfig"]["virtualHosts"][0]["routes"]}
    assert routes[15090] == {"/stats/prometheus"}
    assert routes[15021] == {"/healthz/ready"}
    assert {"/healthz/ready", "/stats/prometheus", "/app-health/web/livez"} <= routes[15020]
    annotations = out["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("15020", "/stats/prometheus")


@pytest.mark.parametrize("native", ["false", "true"])
def test_status_port_zero_means_no_proxy_readiness_probe(native: str) -> None:
    pod = copy.deepcopy(CORPUS["probes-of-each-kind"])
    pod["metadata"]["annotations"] = {"status.sidecar.istio.io/port": "0", "sidecar.istio.io/nativeSidecar": native}
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    proxy = _proxy(out)
    assert "readinessProbe" not in proxy and "startupProbe" not in proxy
    # nothing answers the app's probes on the proxy then: they are left as they were
    assert out["spec"]["containers"][0]["livenessProbe"] == pod["spec"]["containers"][0]["livenessProbe"]
    assert "MESH_KUBE_APP_PROBERS" not in {e["name"] for e in proxy["env"]}


@pytest.mark.parametrize("value", ["-1", "80", "65536", "15001", "15021", "15090", "ready"])
def test_an_invalid_status_port_is_a_clear_deny(value: str) -> None:
    pod = make(
        "s", {"containers": [{"name": "app", "image": "app"}]}, annotations={"status.sidecar.istio.io/port": value}
    )
    outcome = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT))
    assert outcome.error is not None and "status.sidecar.istio.io/port" in str(outcome.error)
    assert "0 (no readiness probe)" in str(outcome.error)


def test_lifecycle_hooks_and_the_users_native_sidecars_are_rewritten_as_probes_are() -> None:
    pod = make(
        "hooks",
        {
            "initContainers": [
                {
                    "name": "log-shipper",
                    "image": "shipper",
                    "restartPolicy": "Always",
                    "ports": [{"name": "admin", "containerPort": 9901}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "admin"}},
                },
                {"name": "migrate", "image": "m"},
            ],
            "containers": [
                {
                    "name": "web",
                    "image": "web",
                    "lifecycle": {
                        "postStart": {"httpGet": {"path": "/warm", "port": 8080}},
                        "preStop": {"tcpSocket": {"port": 8080}},
                    },
                },
                {"name": "batch", "image": "b", "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}}},
            ],
        },
    )
    out = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    web = next(c for c in out["spec"]["containers"] if c["name"] == "web")
    assert web["lifecycle"] == {
        "postStart": {"httpGet": {"path": "/app-lifecycle/web/poststartz", "port": 15020, "scheme": "HTTP"}},
        "preStop": {"httpGet": {"path": "/app-lifecycle/web/prestopz", "port": 15020, "scheme": "HTTP"}},
    }
    batch = next(c for c in out["spec"]["containers"] if c["name"] == "batch")
    assert batch["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}  # exec hooks stay
    shipper = next(c for c in out["spec"]["initContainers"] if c["name"] == "log-shipper")
    assert shipper["readinessProbe"]["httpGet"] == {
        "path": "/app-health/log-shipper/readyz",
        "port": 15020,
        "scheme": "HTTP",
    }
    proxy = _proxy(out)
    kept = json.loads(next(e["value"] for e in proxy["env"] if e["name"] == "MESH_KUBE_APP_PROBERS"))
    assert kept["/app-lifecycle/web/prestopz"] == {"tcpSocket": {"port": 8080}}
    assert kept["/app-health/log-shipper/readyz"] == {"httpGet": {"path": "/ready", "port": "admin"}}
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    clusters = {c["name"] for c in bootstrap["staticResources"]["clusters"]}
    assert {"probe|app-lifecycle|web|poststartz", "probe|app-health|log-shipper|readyz"} <= clusters


def test_the_gateway_template_makes_the_users_istio_proxy_container_the_gateway() -> None:
    """As Istio's gateway chart deploys it: a container `istio-proxy` with `image: auto` and the gateway's ports."""
    gateway = {
        "name": "istio-proxy",
        "image": "auto",
        "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 8443, "name": "https"}],
        "resources": {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}, "periodSeconds": 2},
    }
    pod = make(
        "ingress-5d9f7c-abcde",
        {"serviceAccountName": "ingress", "containers": [gateway]},
        labels={"app": "ingress", "istio": "ingressgateway"},
        annotations={
            "inject.istio.io/templates": "gateway",
            "sidecar.istio.io/nativeSidecar": "true",  # means nothing for a gateway, as in Istio
            "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true",
        },
    )
    outcome = inject(pod, "ingress", InjectionConfig(xds_ca=MESH_ROOT))
    assert outcome.error is None and outcome.decision.inject
    out = outcome.pod
    kubernetes_validate.validate(out, K8S, strict=True)
    assert jsonpatch.apply_patch(pod, outcome.patch) == out
    spec, meta = out["spec"], out["metadata"]
    assert "initContainers" not in spec  # no capture
    (proxy,) = spec["containers"]
    assert proxy["name"] == "mesh-proxy" and proxy["image"] == InjectionConfig().proxy_image
    assert {p["containerPort"] for p in proxy["ports"]} == {8080, 8443, 15090}
    assert proxy["resources"] == gateway["resources"]
    assert "lifecycle" not in proxy or "postStart" not in proxy["lifecycle"]
    assert "restartPolicy" not in proxy
    assert "security.istio.io/tlsMode" not in meta["labels"]  # clients must not send it mesh mTLS
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    assert bootstrap["node"]["id"].startswith("router~$(INSTANCE_IP)~$(POD_NAME).ingress~")
    status = json.loads(meta["annotations"]["sidecar.istio.io/status"])
    assert (status["initContainers"], status["containers"]) == ([], ["mesh-proxy"])
    again = inject(out, "ingress", InjectionConfig(xds_ca=MESH_ROOT))
    assert not again.decision.inject and again.patch == []


@pytest.mark.parametrize(
    ("config", "expected"),
    [(None, ["--concurrency", "2"]), ("concurrency: 4", ["--concurrency", "4"]), ("concurrency: 0", [])],
)
def test_proxy_concurrency_is_istios_two_workers_unless_proxy_config_says(
    config: str | None, expected: list[str]
) -> None:
    annotations = {"proxy.istio.io/config": config} if config else {}
    pod = make("c", {"containers": [{"name": "app", "image": "a"}]}, annotations=annotations)
    args = _proxy(inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod)["args"]
    found = args[args.index("--concurrency") : args.index("--concurrency") + 2] if "--concurrency" in args else []
    assert found == expected
    bad = make(
        "b", {"containers": [{"name": "app", "image": "a"}]}, annotations={"proxy.istio.io/config": "concurrency: many"}
    )
    error = inject(bad, "shop", InjectionConfig(xds_ca=MESH_ROOT)).error
    assert error is not None and "concurrency as a number of worker threads" in str(error)
