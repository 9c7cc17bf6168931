"""deploy/k8s/: every manifest against the Kubernetes JSON schemas, plus how they fit together.

Schema validation uses `kubernetes-validate` (bundled schemas, strict mode: unknown fields fail;
it works offline, which the test enforces by refusing network connections). The
ServiceMonitor is a Prometheus Operator CRD without a bundled schema: it gets structural checks.
The cross-file checks (selectors, probe paths, requests) run with plain `yaml.safe_load`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # the oldest release these files promise to work with
EXPECTED_KINDS = {
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "servicemonitor.yaml": ("monitoring.coreos.com/v1", "ServiceMonitor"),
    "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
    "pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
}
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def _docs() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path.name}: expected one document, found {len(docs)}"
        out[path.name] = docs[0]
    return out


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return _docs()


def test_every_manifest_is_known(docs: dict[str, dict[str, Any]]) -> None:
    assert set(docs) == set(EXPECTED_KINDS)
    for name, doc in docs.items():
        assert (doc["apiVersion"], doc["kind"]) == EXPECTED_KINDS[name], name


@pytest.mark.parametrize("file", sorted(n for n, ak in EXPECTED_KINDS.items() if ak not in CRDS))
def test_schema_valid(file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate for schema checks"
    )

    def no_network(*_a: Any, **_k: Any) -> None:
        raise AssertionError("schema validation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    doc = _docs()[file]
    kv.validate(doc, K8S_VERSION, strict=True)
    # The validator does reject mistakes: an unknown field in the spec fails strict mode.
    bad = {**doc, "spec": {**doc["spec"], "replicaz": 1}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_servicemonitor_structure(docs: dict[str, dict[str, Any]]) -> None:
    sm, svc = docs["servicemonitor.yaml"], docs["service.yaml"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    for endpoint in sm["spec"]["endpoints"]:
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"


def test_deployment_has_probes_requests_and_model_volume(docs: dict[str, dict[str, Any]]) -> None:
    pod = docs["deployment.yaml"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests), "HPA CPU utilization needs a CPU request"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"]
    assert "persistentVolumeClaim" in volumes["models"]


def test_hpa_and_pdb_target_the_deployment(docs: dict[str, dict[str, Any]]) -> None:
    dep = docs["deployment.yaml"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = docs["hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": dep["apiVersion"],
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert dep["spec"]["replicas"] >= hpa["minReplicas"]

    pdb = docs["pdb.yaml"]["spec"]
    assert pdb["minAvailable"] == 1
    # The PDB selects exactly the Deployment's pods (its selector matches their labels).
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"], "a drain could never evict a pod"
