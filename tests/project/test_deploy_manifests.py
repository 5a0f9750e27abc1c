"""Offline checks of deploy/k8s: render every overlay with kustomize, validate each document
strictly against pinned Kubernetes schemas, and enforce the policies schemas cannot express.

Each broken-on-purpose kustomization under tests/fixtures/deploy/k8s/ must be rejected by the
check named in FIXTURES, which shows that the checks bite.
"""

from __future__ import annotations

import os
import re

import pytest
import yaml

from tests.helpers.k8s import (
    FIXTURE_DIR,
    K8S,
    K8S_VERSIONS,
    KUBECTL,
    RENDER_TARGETS,
    REPO,
    Doc,
    _ns,
    _pod_templates,
    _pods_of,
    render,
    schema_errors,
)
from tests.helpers.k8s_network import _is_dns_rule, _policies_for, policy_errors

# A developer without kubectl skips these; CI (CI=true) must run them, so there it is a failure.
pytestmark = pytest.mark.skipif(
    KUBECTL is None and not os.environ.get("CI"),
    reason="kubectl (with its built-in kustomize) is not on PATH: it renders deploy/k8s",
)


# ---------------------------------------------------------------------------------------------
# rendering and schema validation


# ---------------------------------------------------------------------------------------------
# small helpers


# ---------------------------------------------------------------------------------------------
# policy checks: each returns messages "[check] object: what is wrong"


# ---------------------------------------------------------------------------------------------
# the real manifests


@pytest.mark.parametrize("target", RENDER_TARGETS)
def test_renders(target: str) -> None:
    docs = render(K8S / target)
    assert docs, f"{target} renders nothing"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", RENDER_TARGETS)
def test_schema_strict(target: str, version: str) -> None:
    assert schema_errors(render(K8S / target), version) == []


@pytest.mark.parametrize("target", RENDER_TARGETS)
def test_policies(target: str) -> None:
    assert policy_errors(render(K8S / target)) == []


def _kinds(docs: list[Doc]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d["metadata"]["name"])
    return out


def test_dev_overlay_runs_a_coordinator_and_two_silos() -> None:
    docs = render(K8S / "overlays/dev")
    assert {_ns(d) for d in docs if d["kind"] != "Namespace"} == {"pf2lora-dev"}
    kinds = _kinds(docs)
    assert sorted(kinds["Deployment"]) == [
        "pf2lora-coordinator",
        "pf2lora-silo-a",
        "pf2lora-silo-b",
    ]
    assert sorted(kinds["Service"]) == ["pf2lora-coordinator", "pf2lora-coordinator-control"]
    secrets = sorted(
        v["secret"]["secretName"]
        for _, t in _pod_templates(docs)
        for v in t["spec"]["volumes"]
        if "secret" in v
    )
    assert secrets == ["pf2lora-coordinator-tls", "pf2lora-silo-a-tls", "pf2lora-silo-b-tls"]
    # Distinct selectors: the two silo Deployments never adopt each other's pods.
    selectors = [
        tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
        for d in docs
        if d["kind"] == "Deployment"
    ]
    assert len(set(selectors)) == 3
    # Each silo's NetworkPolicy selects exactly its own pods.
    for silo in ("silo-a", "silo-b"):
        ((workload, template),) = [
            (w, t) for w, t in _pods_of(docs, "silo") if w["metadata"]["name"].endswith(silo)
        ]
        names = [p["metadata"]["name"] for p in _policies_for(docs, workload, template)]
        assert names == [f"pf2lora-silo-{silo[-1]}"]


def test_production_publishes_only_the_silo_api_with_tls_passthrough() -> None:
    docs = render(K8S / "overlays/production/coordinator")
    public = [d for d in docs if d["kind"] == "Service" and d["spec"].get("type") == "LoadBalancer"]
    assert len(public) == 1
    (port,) = public[0]["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (443, "silo-api")
    assert public[0]["spec"].get("loadBalancerSourceRanges")
    # Layer 4 only: no Ingress (TLS would end at the controller) in front of mutual TLS.
    assert not [d for d in docs if d["kind"] == "Ingress"]


def test_production_silo_egress_is_the_coordinator_address_only() -> None:
    docs = render(K8S / "overlays/production/silo")
    assert "Service" not in _kinds(docs)
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    rules = [r for r in policy["spec"]["egress"] if not _is_dns_rule(r)]
    assert rules == [
        {
            "to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}],
            "ports": [{"port": 443, "protocol": "TCP"}],
        }
    ]


def test_gpu_overlay_requests_a_gpu_with_the_cuda_image() -> None:
    docs = render(K8S / "overlays/production/silo-gpu")
    ((workload, template),) = _pods_of(docs, "silo")
    (container,) = template["spec"]["containers"]
    assert container["image"].startswith("ghcr.io/pf2lora/pf2lora-silo-cuda:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert any(t.get("key") == "nvidia.com/gpu" for t in template["spec"]["tolerations"])
    assert template["spec"]["nodeSelector"]
    # The CPU overlay keeps the CPU image and asks for no GPU.
    ((_, cpu),) = _pods_of(render(K8S / "overlays/production/silo"), "silo")
    (cpu_container,) = cpu["spec"]["containers"]
    assert cpu_container["image"].startswith("ghcr.io/pf2lora/pf2lora-silo:")
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]


def test_multi_gpu_overlay_runs_one_torchrun_process_per_gpu() -> None:
    docs = render(K8S / "overlays/production/silo-multi-gpu")
    ((_, template),) = _pods_of(docs, "silo")
    (container,) = template["spec"]["containers"]
    assert container["image"].startswith("ghcr.io/pf2lora/pf2lora-silo-cuda:")
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus and int(gpus) > 1
    assert container["command"] == ["torchrun"]
    args = container["args"]
    assert f"--nproc-per-node={gpus}" in args  # one process per GPU
    assert args[args.index("-m") + 1 :] == [
        "pf2lora.cli.main",
        "silo",
        "serve",
        "--config",
        "/etc/pf2lora/silo.toml",
    ]
    # NCCL's shared memory: /dev/shm is a memory-backed volume, larger than the one-GPU silo's
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert volume["emptyDir"]["sizeLimit"] == "16Gi"


def test_images_are_set_through_kustomize_images() -> None:
    """Manifests name the repository; the exact tag comes from a kustomize `images:` entry."""
    for base in ("coordinator", "silo"):
        kust = yaml.safe_load((K8S / "base" / base / "kustomization.yaml").read_text())
        (entry,) = kust["images"]
        assert entry["name"] == f"ghcr.io/pf2lora/pf2lora-{base}"
        assert re.fullmatch(r"\d+\.\d+\.\d+", str(entry["newTag"]))
        raw = yaml.safe_load((K8S / "base" / base / "deployment.yaml").read_text())
        (container,) = raw["spec"]["template"]["spec"]["containers"]
        assert container["image"] == entry["name"]


def test_no_secret_generators_or_key_files_under_deploy() -> None:
    for path in (REPO / "deploy").rglob("*"):
        assert not re.search(r"\.(key|pem|crt|p12|pfx)$", path.name), path
        if path.name == "kustomization.yaml":
            assert "secretGenerator" not in yaml.safe_load(path.read_text()), path


# ---------------------------------------------------------------------------------------------
# broken-on-purpose fixtures: each one must be rejected, by the check it targets

FIXTURES = {
    "missing-readiness-probe": "[probes]",
    "http-liveness-probe": "[probes]",
    "image-latest": "[image]",
    "image-untagged": "[image]",
    "missing-limits": "[resources]",
    "run-as-root": "[security]",
    "writable-root-filesystem": "[security]",
    "no-tmp-volume": "[tmp]",
    "tls-subpath": "[tls]",
    "missing-pvc": "[pvc]",
    "coordinator-rolling-update": "[deployment]",
    "silo-service": "[silo-service]",
    "public-control-api": "[exposure]",
    "pem-in-configmap": "[configmap]",
    "password-in-config": "[configmap]",
    "committed-secret": "[secret]",
    "config-port-mismatch": "[config]",
    "silo-open-egress": "[silo-netpol]",
    "silo-egress-other-port": "[silo-netpol]",
    "silo-egress-wide-ipblock": "[silo-netpol]",
    "silo-without-networkpolicy": "[netpol]",
    "public-metrics": "[netpol]",
    "unknown-field": "[schema]",
    "unknown-kind-servicemonitor": "[schema]",
}
SCHEMA_FIXTURES = {name for name, check in FIXTURES.items() if check == "[schema]"}


def test_every_fixture_is_listed() -> None:
    on_disk = {p.name for p in FIXTURE_DIR.iterdir() if (p / "kustomization.yaml").is_file()}
    assert on_disk == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_is_rejected(name: str) -> None:
    docs = render(FIXTURE_DIR / name)
    check = FIXTURES[name]
    if name in SCHEMA_FIXTURES:
        # Rejected under every pinned Kubernetes version, not only some.
        per_version = {v: schema_errors(docs, v) for v in K8S_VERSIONS}
        assert all(per_version.values()), per_version
        errors = [e for v in K8S_VERSIONS for e in per_version[v]]
    else:
        errors = policy_errors(docs)
        # The fixture is otherwise well-formed: the policy check is what catches it.
        assert schema_errors(docs, K8S_VERSIONS[-1]) == []
    # Rejected, and by the targeted check alone: each fixture carries exactly one defect.
    assert errors, f"{name} was accepted"
    assert {e[: e.index("]") + 1] for e in errors} == {check}, errors
