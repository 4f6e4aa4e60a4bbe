from typing import Any

import pytest

from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.policy import decide, injected_by_istio
from meshplane.webhook.selector import LabelSelector


def pod(
    labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, host_network: bool = False
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "app"}]}
    if host_network:
        spec["hostNetwork"] = True
    return {"metadata": {"labels": labels or {}, "annotations": annotations or {}}, "spec": spec}


NEVER = LabelSelector.parse({"matchLabels": {"tier": "infra"}}, "t")
ALWAYS = LabelSelector.parse({"matchExpressions": [{"key": "team", "operator": "In", "values": ["web", "api"]}]}, "t")
DISABLED = InjectionConfig(enabled_by_default=False)
SELECTORS = InjectionConfig(never_inject=(NEVER,), always_inject=(ALWAYS,), enabled_by_default=False)

CASES = [
    # (case, pod, namespace, namespace labels, config, inject?, reason fragment)
    ("default policy enabled", pod(), "shop", None, InjectionConfig(), True, "default policy is enabled"),
    ("default policy disabled", pod(), "shop", None, DISABLED, False, "default policy is disabled"),
    (
        "host network never",
        pod({"sidecar.istio.io/inject": "true"}, host_network=True),
        "shop",
        None,
        InjectionConfig(),
        False,
        "host network",
    ),
    (
        "kube-system never",
        pod({"sidecar.istio.io/inject": "true"}),
        "kube-system",
        None,
        InjectionConfig(),
        False,
        "never injected",
    ),
    ("kube-public never", pod(), "kube-public", None, InjectionConfig(), False, "never injected"),
    ("kube-node-lease never", pod(), "kube-node-lease", None, InjectionConfig(), False, "never injected"),
    (
        "already injected",
        pod(annotations={"sidecar.istio.io/status": "{}"}),
        "shop",
        None,
        InjectionConfig(),
        False,
        "already injected",
    ),
    (
        "meshplane's status: already injected",
        pod(annotations={"sidecar.istio.io/status": '{"initContainers":["mesh-init"],"containers":["mesh-proxy"]}'}),
        "shop",
        None,
        InjectionConfig(),
        False,
        "already injected",
    ),
    (
        "istio's status: judged as the pod it was",
        pod(annotations={"sidecar.istio.io/status": '{"initContainers":["istio-init"],"containers":["istio-proxy"]}'}),
        "shop",
        None,
        InjectionConfig(),
        True,
        "default policy is enabled",
    ),
    (
        "istio's status, injection disabled",
        pod(
            {"sidecar.istio.io/inject": "false"},
            {"sidecar.istio.io/status": '{"initContainers":["istio-validation"],"containers":["istio-proxy"]}'},
        ),
        "shop",
        None,
        InjectionConfig(),
        False,
        "pod label",
    ),
    ("pod label true", pod({"sidecar.istio.io/inject": "true"}), "shop", None, DISABLED, True, "pod label"),
    ("pod label false", pod({"sidecar.istio.io/inject": "false"}), "shop", None, InjectionConfig(), False, "pod label"),
    (
        "label wins over annotation",
        pod({"sidecar.istio.io/inject": "false"}, {"sidecar.istio.io/inject": "true"}),
        "shop",
        None,
        InjectionConfig(),
        False,
        "pod label",
    ),
    (
        "legacy annotation",
        pod(annotations={"sidecar.istio.io/inject": "true"}),
        "shop",
        None,
        DISABLED,
        True,
        "pod annotation",
    ),
    (
        "legacy annotation false",
        pod(annotations={"sidecar.istio.io/inject": "n"}),
        "shop",
        None,
        InjectionConfig(),
        False,
        "pod annotation",
    ),
    ("namespace enabled", pod(), "shop", {"istio-injection": "enabled"}, DISABLED, True, "injection enabled"),
    ("mesh-injection enabled", pod(), "shop", {"mesh-injection": "enabled"}, DISABLED, True, "injection enabled"),
    (
        "namespace disabled beats pod label",
        pod({"sidecar.istio.io/inject": "true"}),
        "shop",
        {"istio-injection": "disabled"},
        InjectionConfig(),
        False,
        "injection disabled",
    ),
    (
        "namespace enabled, pod opts out",
        pod({"sidecar.istio.io/inject": "false"}),
        "shop",
        {"istio-injection": "enabled"},
        InjectionConfig(),
        False,
        "pod label",
    ),
    ("revision matches", pod({"istio.io/rev": "default"}), "shop", None, DISABLED, True, "is this control plane"),
    (
        "revision of another",
        pod({"istio.io/rev": "canary"}),
        "shop",
        None,
        InjectionConfig(),
        False,
        "another control plane",
    ),
    (
        "namespace revision of another",
        pod(),
        "shop",
        {"istio.io/rev": "canary"},
        InjectionConfig(),
        False,
        "another control plane",
    ),
    (
        "neverInjectSelector",
        pod({"tier": "infra"}),
        "shop",
        None,
        InjectionConfig(never_inject=(NEVER,)),
        False,
        "neverInjectSelector",
    ),
    ("alwaysInjectSelector", pod({"team": "web"}), "shop", None, SELECTORS, True, "alwaysInjectSelector"),
    (
        "never beats always",
        pod({"team": "web", "tier": "infra"}),
        "shop",
        None,
        SELECTORS,
        False,
        "neverInjectSelector",
    ),
    (
        "selector beats namespace label",
        pod({"tier": "infra"}),
        "shop",
        {"istio-injection": "enabled"},
        SELECTORS,
        False,
        "neverInjectSelector",
    ),
    (
        "pod label beats never selector",
        pod({"tier": "infra", "sidecar.istio.io/inject": "true"}),
        "shop",
        None,
        SELECTORS,
        True,
        "pod label",
    ),
]


@pytest.mark.parametrize(
    ("case", "p", "ns", "ns_labels", "config", "inject", "reason"), CASES, ids=[c[0] for c in CASES]
)
def test_policy(
    case: str,
    p: dict[str, Any],
    ns: str,
    ns_labels: dict[str, str] | None,
    config: InjectionConfig,
    inject: bool,
    reason: str,
) -> None:
    decision = decide(p, ns, config, ns_labels)
    assert decision.inject is inject, decision.reason
    assert reason in decision.reason


def test_selector_operators() -> None:
    s = LabelSelector.parse(
        {
            "matchExpressions": [
                {"key": "a", "operator": "Exists"},
                {"key": "b", "operator": "DoesNotExist"},
                {"key": "c", "operator": "NotIn", "values": ["x"]},
            ]
        },
        "t",
    )
    assert s.matches({"a": "1"}) and s.matches({"a": "1", "c": "y"})
    assert not s.matches({"a": "1", "b": "2"}) and not s.matches({"a": "1", "c": "x"}) and not s.matches({})


@pytest.mark.parametrize(
    ("status", "istio"),
    [
        ('{"initContainers":["istio-init"],"containers":["istio-proxy"],"revision":"default"}', True),
        ('{"initContainers":["istio-init","istio-proxy"],"containers":null}', True),
        ('{"initContainers":["istio-validation"],"containers":["istio-proxy"]}', True),
        ('{"initContainers":["mesh-init"],"containers":["mesh-proxy"]}', False),
        ('{"containers":["istio-proxy","mesh-proxy"]}', False),
        ('{"containers":"istio-proxy"}', False),
        ("{}", False),
        ("[]", False),
        ("not json", False),
        ("", False),
    ],
)
def test_a_status_written_by_istio_is_told_from_meshplanes(status: str, istio: bool) -> None:
    assert injected_by_istio({"sidecar.istio.io/status": status}) is istio
