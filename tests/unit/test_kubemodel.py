"""Kubernetes objects -> model, as Istio maps them (pure; objects shaped as the API server returns them)."""

from meshplane.controlplane.kubemodel import view
from meshplane.controlplane.model import MtlsMode, Protocol
from tests.fakekube import endpoint_slice, namespace, pod, service


def key(obj: dict) -> tuple[str, str]:  # type: ignore[type-arg]
    return (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def mapped(*objects: dict) -> object:  # type: ignore[type-arg]
    by_kind: dict[str, dict] = {"Namespace": {}, "Service": {}, "EndpointSlice": {}, "Pod": {}}  # type: ignore[type-arg]
    for o in objects:
        by_kind[o["kind"]][key(o)] = o
    namespaces = {k[1]: v for k, v in by_kind["Namespace"].items()}
    return view(namespaces, by_kind["Service"], by_kind["EndpointSlice"], by_kind["Pod"])


def injected(p: dict) -> dict:  # type: ignore[type-arg]
    p["metadata"].setdefault("annotations", {})["sidecar.istio.io/status"] = "{}"
    return p


def test_a_service_with_a_ready_slice_gets_its_pods_with_their_identity_and_ports() -> None:
    svc = service(
        "web", "demo", ports=[("http-api", 80), ("grpc", 90)], selector={"app": "web"}, cluster_ip="10.96.0.7"
    )
    svc["spec"]["ports"][0]["targetPort"] = "api"  # named: resolved per pod by the slice
    v = mapped(
        namespace("demo"),
        svc,
        injected(pod("web-1", "demo", ip="10.1.0.5", labels={"app": "web"}, service_account="web")),
        pod("legacy", "demo", ip="10.1.0.6", labels={"app": "web"}),
        endpoint_slice(
            "web-a", "demo", "web", addresses=["10.1.0.5", "10.1.0.6"], ports=[("http-api", 8080), ("grpc", 9090)],
            target_pods=["web-1", "legacy"],
        ),
    )  # fmt: skip
    (s,) = v.services  # type: ignore[attr-defined]
    assert s.addresses == ("10.96.0.7",) and [p.protocol for p in s.ports] == [Protocol.HTTP, Protocol.GRPC]
    first, second = s.endpoints
    assert first.workload.service_account == "web" and first.workload.sidecar
    assert dict(first.ports) == {"http-api": 8080, "grpc": 9090}
    assert not second.workload.sidecar  # no sidecar: plaintext, and not in the accepted SANs
    assert {w.name for w in v.workloads} == {"web-1", "legacy"}  # type: ignore[attr-defined]


def test_terminating_endpoints_only_when_none_is_ready() -> None:
    ready = endpoint_slice("a", "demo", "web", addresses=["10.1.0.5"])
    going = endpoint_slice("b", "demo", "web", addresses=["10.1.0.6"], ready=False)
    going["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    svc = service("web", "demo", selector={"app": "web"})
    (s,) = mapped(svc, ready, going).services  # type: ignore[attr-defined]
    assert [e.workload.address for e in s.endpoints] == ["10.1.0.5"]
    (s,) = mapped(svc, going).services  # type: ignore[attr-defined]
    assert [e.workload.address for e in s.endpoints] == ["10.1.0.6"]
    gone = endpoint_slice("c", "demo", "web", addresses=["10.1.0.7"], ready=False)
    (s,) = mapped(svc, gone).services  # type: ignore[attr-defined]
    assert s.endpoints == ()


def test_app_protocol_headless_external_name_and_udp() -> None:
    svc = service("db", "demo", ports=[("db", 5432), ("web", 80)], cluster_ip="None")
    svc["spec"]["ports"][1]["appProtocol"] = "kubernetes.io/h2c"
    dns = service("ext", "demo", ports=[("https", 443)])
    dns["spec"] |= {"type": "ExternalName", "externalName": "api.example.com."}
    udp = service("dns", "demo", ports=[("dns", 53)])
    udp["spec"]["ports"][0]["protocol"] = "UDP"
    v = mapped(svc, dns, udp)
    by_name = {s.name: s for s in v.services}  # type: ignore[attr-defined]
    assert by_name["db"].addresses == () and [p.protocol for p in by_name["db"].ports] == [Protocol.TCP, Protocol.HTTP2]
    assert by_name["ext"].external_name == "api.example.com"
    assert "dns" not in by_name and any("no TCP ports" in line for line in v.skipped)  # type: ignore[attr-defined]


def test_objects_that_make_no_sense_are_skipped_and_named() -> None:
    zero = service("zero", "demo", ports=[("http", 80)])
    zero["spec"]["ports"][0]["port"] = 0
    badname = service("badname", "demo", ports=[("Not_A_Name", 80)])
    crowded = pod("crowded", "demo", ip="10.1.0.9", labels={f"k{i}": "v" for i in range(100)})
    v = mapped(zero, badname, crowded, service("fine", "demo"))
    assert [s.name for s in v.services] == ["fine"]  # type: ignore[attr-defined]
    skipped = "\n".join(v.skipped)  # type: ignore[attr-defined]
    assert "Service demo/zero: ports[0].port 0" in skipped and "Service demo/badname" in skipped
    assert "Pod demo/crowded: 100 labels" in skipped


def test_mtls_from_pod_then_namespace_annotations() -> None:
    ns = namespace("demo")
    ns["metadata"]["annotations"] = {"security.meshplane.io/mtls": "PERMISSIVE"}
    strict = pod("a", "demo", ip="10.1.0.1", annotations={"security.meshplane.io/mtls": "strict"})
    plain = pod("b", "demo", ip="10.1.0.2")
    typo = pod("c", "demo", ip="10.1.0.3", annotations={"security.meshplane.io/mtls": "sometimes"})
    v = mapped(ns, strict, plain, typo)
    modes = {w.name: w.mtls for w in v.workloads}  # type: ignore[attr-defined]
    assert modes == {"a": MtlsMode.STRICT, "b": MtlsMode.PERMISSIVE, "c": MtlsMode.PERMISSIVE}
    assert any("Pod demo/c" in line and "sometimes" in line for line in v.skipped)  # type: ignore[attr-defined]


def test_a_gateway_pod_is_sent_plaintext_and_the_tls_mode_label_decides() -> None:
    gateway = injected(pod("ingress-1", "demo", ip="10.1.0.8", labels={"app": "web"}))
    gateway["metadata"]["annotations"]["inject.istio.io/templates"] = "gateway"
    opted_out = injected(pod("web-2", "demo", ip="10.1.0.9", labels={"app": "web"}))
    opted_out["metadata"]["labels"]["security.istio.io/tlsMode"] = "disabled"
    labelled = pod("web-3", "demo", ip="10.1.0.10", labels={"app": "web", "security.istio.io/tlsMode": "istio"})
    v = mapped(
        namespace("demo"),
        service("web", "demo", ports=[("http", 80)], selector={"app": "web"}),
        gateway, opted_out, labelled,
        endpoint_slice(
            "web-a", "demo", "web", addresses=["10.1.0.8", "10.1.0.9", "10.1.0.10"],
            target_pods=["ingress-1", "web-2", "web-3"],
        ),
    )  # fmt: skip
    (s,) = v.services  # type: ignore[attr-defined]
    assert {e.workload.name: e.workload.sidecar for e in s.endpoints} == {
        "ingress-1": False,
        "web-2": False,
        "web-3": True,
    }


def test_a_view_with_a_memo_maps_only_replaced_pods_and_equals_one_without() -> None:
    from meshplane.controlplane.kubemodel import PodMemo

    objects = [
        namespace("demo"),
        service("web", "demo", ports=[("http", 80)], selector={"app": "web"}),
        injected(pod("web-1", "demo", ip="10.1.0.5", labels={"app": "web"})),
        injected(pod("web-2", "demo", ip="10.1.0.6", labels={"app": "web"})),
        endpoint_slice("web-a", "demo", "web", addresses=["10.1.0.5", "10.1.0.6"], target_pods=["web-1", "web-2"]),
    ]
    by_kind: dict[str, dict] = {"Namespace": {}, "Service": {}, "EndpointSlice": {}, "Pod": {}}  # type: ignore[type-arg]
    for o in objects:
        by_kind[o["kind"]][key(o)] = o
    namespaces = {k[1]: v for k, v in by_kind["Namespace"].items()}
    memo = PodMemo()
    first = view(namespaces, by_kind["Service"], by_kind["EndpointSlice"], by_kind["Pod"], memo)
    # web-2 is replaced (as an informer does on any change): a new label; web-1 is the same object
    changed = injected(pod("web-2", "demo", ip="10.1.0.6", labels={"app": "web", "version": "v2"}))
    by_kind["Pod"][("demo", "web-2")] = changed
    second = view(namespaces, by_kind["Service"], by_kind["EndpointSlice"], by_kind["Pod"], memo)
    assert second == view(namespaces, by_kind["Service"], by_kind["EndpointSlice"], by_kind["Pod"])
    one, two = (w for w in second.workloads)
    assert one is first.workloads[0]  # not mapped again
    assert dict(two.labels)["version"] == "v2" and two is not first.workloads[1]
