import pytest
import yaml

from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.manifests import ManifestError, inject_manifests
from tests.harness import MESH_ROOT

WORKLOADS = """\
# Shop manifests: comments stay where they are.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web  # the web tier
  namespace: shop
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx}]
---
apiVersion: v1
kind: ConfigMap  # not a pod: passes through untouched
metadata: {name: settings}
data: {key: value}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 1 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: job, image: job}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: StatefulSet
    metadata: {name: db}
    spec:
      serviceName: db
      selector: {matchLabels: {app: db}}
      template:
        metadata: {labels: {app: db}, annotations: {sidecar.istio.io/inject: "false"}}
        spec: {containers: [{name: db, image: postgres}]}
"""


def containers(template: dict) -> list[str]:  # type: ignore[type-arg]
    return [c["name"] for c in template["spec"]["containers"]]


def test_workloads_are_injected_and_the_rest_passes_through() -> None:
    out, report = inject_manifests(WORKLOADS, InjectionConfig(xds_ca=MESH_ROOT))
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Deployment", "ConfigMap", "CronJob", "List"]
    assert containers(docs[0]["spec"]["template"]) == ["web", "mesh-proxy"]
    assert docs[1] == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings"},
        "data": {"key": "value"},
    }
    assert containers(docs[2]["spec"]["jobTemplate"]["spec"]["template"]) == ["job", "mesh-proxy"]
    assert containers(docs[3]["items"][0]["spec"]["template"]) == ["db"]
    assert report == [
        "Deployment shop/web: injected (the default policy is enabled)",
        "CronJob default/nightly: injected (the default policy is enabled)",
        "StatefulSet default/db: not injected (pod annotation sidecar.istio.io/inject=false)",
    ]
    assert out.startswith("# Shop manifests: comments stay where they are.\n")
    assert "name: web  # the web tier" in out and "kind: ConfigMap  # not a pod" in out


def test_a_pod_the_webhook_would_deny_is_an_error() -> None:
    bad = WORKLOADS.replace(
        "metadata: {labels: {app: web}}",
        "metadata: {labels: {app: web}, annotations: {sidecar.istio.io/proxyCPU: lots}}",
    )
    with pytest.raises(
        ManifestError,
        match=r"m.yaml: document 1 \(Deployment shop/web\): annotation "
        r"sidecar.istio.io/proxyCPU",
    ):
        inject_manifests(bad, InjectionConfig(xds_ca=MESH_ROOT), "m.yaml")
    with pytest.raises(ManifestError, match="not valid YAML"):
        inject_manifests("a: [", InjectionConfig(xds_ca=MESH_ROOT), "m.yaml")


OTHER_KINDS = """\
apiVersion: v1
kind: ReplicationController
metadata: {name: legacy, namespace: shop}
spec:
  replicas: 1
  selector: {app: legacy}
  template:
    metadata: {labels: {app: legacy}}
    spec:
      containers: [{name: legacy, image: legacy}]
---
apiVersion: apps.openshift.io/v1
kind: DeploymentConfig
metadata: {name: frontend, namespace: shop}
spec:
  replicas: 1
  selector: {app: frontend}
  triggers: [{type: ConfigChange}]
  template:
    metadata: {labels: {app: frontend}}
    spec:
      containers: [{name: frontend, image: frontend}]
---
apiVersion: v1
kind: ReplicationController
metadata: {name: no-template}
spec: {replicas: 0, selector: {app: x}}
"""


def test_replication_controllers_and_deployment_configs_are_injected() -> None:
    out, report = inject_manifests(OTHER_KINDS, InjectionConfig(xds_ca=MESH_ROOT))
    rc, dc, bare = yaml.safe_load_all(out)
    assert containers(rc["spec"]["template"]) == ["legacy", "mesh-proxy"]
    assert containers(dc["spec"]["template"]) == ["frontend", "mesh-proxy"]
    assert [c["name"] for c in dc["spec"]["template"]["spec"]["initContainers"]] == ["mesh-init"]
    assert dc["apiVersion"] == "apps.openshift.io/v1" and dc["spec"]["triggers"] == [{"type": "ConfigChange"}]
    assert bare == {
        "apiVersion": "v1",
        "kind": "ReplicationController",
        "metadata": {"name": "no-template"},
        "spec": {"replicas": 0, "selector": {"app": "x"}},
    }
    assert report == [
        "ReplicationController shop/legacy: injected (the default policy is enabled)",
        "DeploymentConfig shop/frontend: injected (the default policy is enabled)",
    ]


def test_an_istio_injected_template_in_a_list_is_migrated() -> None:
    status = '{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy"]}'
    istio = f"""\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: ReplicationController
  metadata: {{name: legacy, namespace: shop}}
  spec:
    template:
      metadata:
        labels: {{app: legacy, security.istio.io/tlsMode: istio}}
        annotations: {{sidecar.istio.io/status: '{status}'}}
      spec:
        initContainers: [{{name: istio-init, image: proxyv2}}]
        containers: [{{name: legacy, image: legacy}}, {{name: istio-proxy, image: proxyv2}}]
        volumes: [{{name: istio-envoy, emptyDir: {{medium: Memory}}}}]
"""
    out, report = inject_manifests(istio, InjectionConfig(xds_ca=MESH_ROOT))
    template = yaml.safe_load(out)["items"][0]["spec"]["template"]
    assert containers(template) == ["legacy", "mesh-proxy"]
    assert [c["name"] for c in template["spec"]["initContainers"]] == ["mesh-init"]
    assert [v["name"] for v in template["spec"]["volumes"]] == ["istio-token"]
    assert "replaced" in report[0]
