"""deploy/k8s as the tests see it: the contract values (ports, paths, user), rendering with
`kubectl kustomize`, strict schema validation, and helpers to walk the rendered documents.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]


K8S = REPO / "deploy" / "k8s"


FIXTURE_DIR = REPO / "tests" / "fixtures" / "deploy" / "k8s"


# Every kustomization a user applies (plus the bases, which must stand alone too).
RENDER_TARGETS = (
    "base/coordinator",
    "base/silo",
    "overlays/dev",
    "overlays/production/coordinator",
    "overlays/production/silo",
    "overlays/production/silo-gpu",
    "overlays/production/silo-multi-gpu",
)


# kubernetes-validate 1.37.0 ships schemas for 1.25 .. 1.37. gRPC probes are GA from 1.27;
# 1.29 is the oldest release still under (extended) support at the big providers, 1.33 a
# common current one, 1.37 the newest schema shipped.
K8S_VERSIONS = ("1.29", "1.33", "1.37")


UID = 10001


HEALTH_PORT = 8081


METRICS_PORT = 9100


SILO_API_PORT = 8443


CONTROL_API_PORT = 8444


# The port a silo may dial the coordinator on: the silo API directly, or its public 443.
COORDINATOR_DIAL_PORTS = {SILO_API_PORT, 443}


TLS_DIR = "/etc/pf2lora/tls"


TLS_FILES = ("ca.crt", "tls.crt", "tls.key")


STATE_DIRS = {"coordinator": "/var/lib/pf2lora", "silo": "/var/lib/pf2lora-silo"}


CONFIG_FILES = {"coordinator": "coordinator.toml", "silo": "silo.toml"}


SECRET_NAME = {
    "coordinator": re.compile(r"^pf2lora-coordinator-tls$"),
    "silo": re.compile(r"^pf2lora-silo(-[a-z0-9-]+)?-tls$"),
}


# TOML keys the daemons read (the contract between these ConfigMaps and the daemons).
REQUIRED_CONFIG_KEYS = {
    "coordinator": (
        "federation.name",
        "federation.allowed_silos",
        "server.silo_api_listen",
        "server.control_api_listen",
        "server.health_listen",
        "server.metrics_listen",
        "tls.ca_file",
        "tls.cert_file",
        "tls.key_file",
        "storage.state_dir",
    ),
    "silo": (
        "silo.id",
        "silo.federation",
        "silo.state_dir",
        "silo.device",
        "coordinator.address",
        "tls.ca_file",
        "tls.cert_file",
        "tls.key_file",
        "model.path",
        "data.train_files",
        "data.eval_files",
        "server.health_listen",
        "server.metrics_listen",
    ),
}


POD_TEMPLATE = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


KUBECTL = shutil.which("kubectl")


Doc = dict[str, Any]


@functools.cache
def _render_text(path: Path) -> str:
    assert KUBECTL is not None, (
        "kubectl (with kustomize) must be on PATH in CI: it renders deploy/k8s"
    )
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return proc.stdout


def render(path: Path) -> list[Doc]:
    """The rendered documents of one kustomization (a fresh copy on every call)."""
    return [d for d in yaml.safe_load_all(_render_text(path)) if d]


def schema_errors(docs: list[Doc], version: str) -> list[str]:
    """Strict schema validation; a kind without a built-in schema (a CRD) is an error too."""
    errors = []
    for doc in docs:
        where = _where(doc)
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(
                f"[schema] {where}: unknown kind, no schema in Kubernetes {version}: {exc.message}"
            )
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"[schema] {where} (Kubernetes {version}): {path}: {exc.message}")
    return errors


def _where(doc: Doc) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name')}"


def _dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _ns(doc: Doc) -> str | None:
    return _dig(doc, "metadata", "namespace")


def _pod_templates(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod template) for every object that runs pods."""
    for doc in docs:
        kind = doc.get("kind")
        if kind == "Pod":
            yield doc, doc
        elif kind in POD_TEMPLATE:
            template = _dig(doc, *POD_TEMPLATE[kind])
            if isinstance(template, dict):
                yield doc, template


def _component(template: Doc) -> str | None:
    return _dig(template, "metadata", "labels", "app.kubernetes.io/component")


def _selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels only; expressions are refused) matches labels."""
    if selector is None:
        return False
    if selector.get("matchExpressions"):
        raise AssertionError(f"matchExpressions are not supported by these checks: {selector}")
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _pods_of(docs: list[Doc], component: str) -> list[tuple[Doc, Doc]]:
    return [(w, t) for w, t in _pod_templates(docs) if _component(t) == component]


def _port_of(listen: Any) -> int | None:
    if not isinstance(listen, str) or ":" not in listen:
        return None
    try:
        return int(listen.rsplit(":", 1)[1])
    except ValueError:
        return None


def _toml_get(data: Doc, dotted: str) -> Any:
    return _dig(data, *dotted.split("."))
