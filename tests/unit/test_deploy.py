"""The Kubernetes manifests and the generated webhook configuration match the Kubernetes 1.30 schema."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from meshplane.webhook.registration import webhook_configuration

DEPLOY = Path(__file__).parents[2] / "deploy" / "kubernetes"


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_are_valid(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_the_service_fronts_what_the_webhook_config_names() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "meshplane.yaml").read_text())}
    config = webhook_configuration(ca_bundle=b"root", service="meshplane", namespace="mesh-system")
    kubernetes_validate.validate(config, "1.30", strict=True)
    service = config["webhooks"][0]["clientConfig"]["service"]
    assert (docs["Service"]["metadata"]["name"], docs["Service"]["metadata"]["namespace"]) == (
        service["name"],
        service["namespace"],
    )
    assert service["port"] in {p["port"] for p in docs["Service"]["spec"]["ports"]}
