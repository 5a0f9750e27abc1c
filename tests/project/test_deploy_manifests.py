"""Offline checks of deploy/k8s: render every overlay with kustomize, validate each document
strictly against pinned Kubernetes schemas, and enforce the policies schemas cannot express.

Each broken-on-purpose kustomization under tests/fixtures/deploy/k8s/ must be rejected by the
check named in FIXTURES, which shows that the checks bite.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
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
# A developer without kubectl skips these; CI (CI=true) must run them, so there it is a failure.
pytestmark = pytest.mark.skipif(
    KUBECTL is None and not os.environ.get("CI"),
    reason="kubectl (with its built-in kustomize) is not on PATH: it renders deploy/k8s",
)

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# rendering and schema validation


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


# ---------------------------------------------------------------------------------------------
# small helpers


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


# ---------------------------------------------------------------------------------------------
# policy checks: each returns messages "[check] object: what is wrong"


def check_no_secrets(docs: list[Doc]) -> list[str]:
    """TLS Secrets are created out of band from `pf2lora certs` output, never rendered."""
    return [
        f"[secret] {_where(d)}: a Secret is in the manifests; create it out of band "
        "(deploy/README.md), never commit key material"
        for d in docs
        if d.get("kind") == "Secret"
    ]


_SECRET_KEY_NAME = re.compile(
    r"(?i)(^|[_.-])(password|passwd|passphrase|token|secret|api_?key|private_?key|key)$"
)
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(password|passwd|passphrase|token|secret|api[_-]?key|private[_-]?key)\b\s*[:=]\s*\S"
)
_SECRET_VALUE = (
    re.compile(r"-----BEGIN [A-Z0-9 ]+-----"),  # PEM: keys and certificates
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # a JWT
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # an AWS access key id
    re.compile(r"\b(ghp|gho|ghs|github_pat|glpat|xox[abp])[-_][A-Za-z0-9_-]{10,}"),
    re.compile(r"(?<![/\w])[A-Za-z0-9+/]{40,}={0,2}(?![/\w])"),  # a long base64 blob
)


def _secret_looking(value: str) -> bool:
    return any(p.search(value) for p in _SECRET_VALUE)


def _walk_toml(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _walk_toml(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    elif isinstance(data, list):
        for item in data:
            yield from _walk_toml(item, prefix)
    else:
        yield prefix, data


def check_configmaps(docs: list[Doc]) -> list[str]:
    """Non-secret settings only: no PEM, no key/password/token values, TOML that parses."""
    errors = []
    for doc in docs:
        if doc.get("kind") != "ConfigMap":
            continue
        where = _where(doc)
        if doc.get("binaryData"):
            errors.append(f"[configmap] {where}: binaryData is not allowed (opaque bytes)")
        for name, text in (doc.get("data") or {}).items():
            text = str(text)
            if re.search(r"\.(key|pem|crt|p12|pfx|jks)$", name) or _SECRET_KEY_NAME.search(name):
                errors.append(f"[configmap] {where}: entry {name!r} looks like key material")
            if _secret_looking(text):
                errors.append(
                    f"[configmap] {where}: entry {name!r} holds a secret-looking value "
                    "(PEM block, token or long base64)"
                )
            if _SECRET_ASSIGNMENT.search(text):
                errors.append(
                    f"[configmap] {where}: entry {name!r} assigns a password/token/secret"
                )
            if name.endswith(".toml"):
                try:
                    data = tomllib.loads(text)
                except tomllib.TOMLDecodeError as exc:
                    errors.append(f"[configmap] {where}: {name} is not valid TOML: {exc}")
                    continue
                for key, value in _walk_toml(data):
                    leaf = key.rsplit(".", 1)[-1]
                    if _SECRET_KEY_NAME.search(leaf) and value not in ("", None):
                        errors.append(
                            f"[configmap] {where}: {name} sets {key}, a secret; "
                            "secrets belong in a mounted Secret"
                        )
    return errors


def _image_errors(where: str, image: Any) -> list[str]:
    if not isinstance(image, str) or not image:
        return [f"[image] {where}: no image"]
    name, _, digest = image.partition("@")
    if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return [f"[image] {where}: malformed digest in {image!r}"]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"[image] {where}: {image!r} has no tag (pin an exact version tag)"]
    tag = last.split(":", 1)[1]
    if tag.lower() in ("latest", "stable", "main", "master", "edge", "nightly") or not re.search(
        r"\d", tag
    ):
        return [f"[image] {where}: {image!r} uses the moving tag {tag!r}"]
    return []


def _probe_errors(where: str, container: Doc) -> list[str]:
    errors = []
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            if kind != "startupProbe":
                errors.append(f"[probes] {where}: no {kind}")
            continue
        port = _dig(probe, "grpc", "port")
        other = [k for k in ("httpGet", "tcpSocket", "exec") if k in probe]
        if port != HEALTH_PORT or other:
            errors.append(
                f"[probes] {where}: {kind} must be a grpc probe on the health port "
                f"{HEALTH_PORT} (mutual-TLS ports cannot be probed), got {probe}"
            )
    ports = {p.get("containerPort") for p in container.get("ports") or []}
    if HEALTH_PORT not in ports:
        errors.append(f"[probes] {where}: the health port {HEALTH_PORT} is not declared")
    return errors


def _resource_errors(where: str, container: Doc) -> list[str]:
    errors = []
    resources = container.get("resources") or {}
    for section in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in (resources.get(section) or {}):
                errors.append(f"[resources] {where}: no {section}.{res}")
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for res in set(requests) | set(limits):
        if "/" in res and str(requests.get(res)) != str(limits.get(res)):
            errors.append(f"[resources] {where}: extended resource {res} needs requests == limits")
    return errors


def _security_errors(where: str, pod_spec: Doc, container: Doc) -> list[str]:
    errors = []
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}

    def effective(key: str) -> Any:
        return sc[key] if key in sc else pod_sc.get(key)

    if effective("runAsNonRoot") is not True:
        errors.append(f"[security] {where}: runAsNonRoot must be true")
    if effective("runAsUser") != UID:
        errors.append(
            f"[security] {where}: runAsUser must be {UID} (the image's user), got "
            f"{effective('runAsUser')!r}"
        )
    if sc.get("allowPrivilegeEscalation") is not False:
        errors.append(f"[security] {where}: allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        errors.append(f"[security] {where}: readOnlyRootFilesystem must be true")
    if sc.get("privileged"):
        errors.append(f"[security] {where}: privileged")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        errors.append(f"[security] {where}: capabilities must drop ALL")
    if caps.get("add"):
        errors.append(f"[security] {where}: adds capabilities {caps['add']}")
    seccomp = _dig(sc, "seccompProfile", "type") or _dig(pod_sc, "seccompProfile", "type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        errors.append(f"[security] {where}: seccompProfile must be RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            errors.append(f"[security] {where}: {key} is set")
    return errors


def check_workloads(docs: list[Doc]) -> list[str]:
    """Probes, resources, pinned images, restricted security, volumes, Deployment strategy."""
    errors = []
    by_ns_kind: dict[tuple[str | None, str], set[str]] = {}
    for doc in docs:
        by_ns_kind.setdefault((_ns(doc), doc.get("kind", "")), set()).add(
            _dig(doc, "metadata", "name")
        )
    configmaps = {
        (_ns(d), _dig(d, "metadata", "name")): d for d in docs if d.get("kind") == "ConfigMap"
    }

    for workload, template in _pod_templates(docs):
        wname = _where(workload)
        ns = _ns(workload)
        component = _component(template)
        labels = _dig(template, "metadata", "labels") or {}
        spec = template.get("spec") or {}
        if labels.get("app.kubernetes.io/name") != "pf2lora" or component not in STATE_DIRS:
            errors.append(
                f"[labels] {wname}: pod labels need app.kubernetes.io/name=pf2lora and "
                f"app.kubernetes.io/component in {sorted(STATE_DIRS)}, got {labels}"
            )
            continue
        annotations = _dig(template, "metadata", "annotations") or {}
        want = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(METRICS_PORT),
            "prometheus.io/path": "/metrics",
        }
        for key, value in want.items():
            if annotations.get(key) != value:
                errors.append(f"[metrics] {wname}: pod annotation {key} must be {value!r}")
        if spec.get("automountServiceAccountToken") is not False:
            errors.append(f"[security] {wname}: automountServiceAccountToken must be false")

        if workload.get("kind") != "Deployment":
            errors.append(f"[deployment] {wname}: pf2lora daemons run as Deployments")
        else:
            if _dig(workload, "spec", "replicas") != 1:
                errors.append(
                    f"[deployment] {wname}: replicas must be 1 (one writer of the "
                    "state volume), got "
                    f"{_dig(workload, 'spec', 'replicas')!r}"
                )
            if _dig(workload, "spec", "strategy", "type") != "Recreate":
                errors.append(
                    f"[deployment] {wname}: strategy must be Recreate (never two pods "
                    "on one state volume)"
                )

        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        for v in volumes.values():
            if "hostPath" in v:
                errors.append(f"[security] {wname}: hostPath volume {v.get('name')}")
        containers = spec.get("containers") or []
        if len(containers) != 1:
            errors.append(f"[deployment] {wname}: expected one container, got {len(containers)}")
        for init in spec.get("initContainers") or []:
            where = f"{wname} initContainer {init.get('name')}"
            errors += _image_errors(where, init.get("image"))
            errors += _resource_errors(where, init)
            errors += _security_errors(where, spec, init)
        for container in containers:
            where = f"{wname} container {container.get('name')}"
            errors += _image_errors(where, container.get("image"))
            errors += _probe_errors(where, container)
            errors += _resource_errors(where, container)
            errors += _security_errors(where, spec, container)
            args = container.get("args") or []
            config_path = f"/etc/pf2lora/{CONFIG_FILES[component]}"
            if args != [component, "serve", "--config", config_path]:
                errors.append(
                    f"[deployment] {where}: args must be "
                    f"['{component}', 'serve', '--config', '{config_path}'], got {args}"
                )
            mounts = {m.get("mountPath"): m for m in container.get("volumeMounts") or []}

            # /tmp: the only writable place besides the state volume.
            tmp = mounts.get("/tmp")
            if tmp is None or "emptyDir" not in volumes.get(tmp.get("name"), {}):
                errors.append(f"[tmp] {where}: /tmp must be an emptyDir (read-only root)")

            # TLS: the Secret as a directory, never subPath (rotation updates it in place).
            tls = mounts.get(TLS_DIR)
            tls_volume = volumes.get(tls.get("name")) if tls else None
            secret = (tls_volume or {}).get("secret")
            if tls is None or secret is None:
                errors.append(f"[tls] {where}: no Secret volume mounted at {TLS_DIR}")
            else:
                for m in container.get("volumeMounts") or []:
                    if m.get("name") == tls.get("name") and m.get("subPath"):
                        errors.append(
                            f"[tls] {where}: the TLS Secret is mounted with subPath; "
                            "rotated certificates would never reach the pod"
                        )
                if not tls.get("readOnly"):
                    errors.append(f"[tls] {where}: the TLS mount must be readOnly")
                if not SECRET_NAME[component].match(str(secret.get("secretName"))):
                    errors.append(
                        f"[tls] {where}: unexpected TLS Secret name {secret.get('secretName')!r}"
                    )
                mode = secret.get("defaultMode", 0o644)
                if mode & 0o007:
                    errors.append(f"[tls] {where}: TLS files are world-readable (mode {mode:o})")
                items = secret.get("items")
                if items is not None and sorted(i.get("path") for i in items) != sorted(TLS_FILES):
                    errors.append(f"[tls] {where}: the TLS Secret must provide {TLS_FILES}")
            for path, m in mounts.items():
                if path != TLS_DIR and path.startswith(TLS_DIR):
                    errors.append(f"[tls] {where}: a second mount {path} inside {TLS_DIR}")
                v = volumes.get(m.get("name"), {})
                if "secret" in v and path != TLS_DIR:
                    errors.append(f"[tls] {where}: Secret mounted outside {TLS_DIR} at {path}")

            # State on a PVC that is part of the same render.
            state = mounts.get(STATE_DIRS[component])
            claim = _dig(
                volumes.get(state.get("name")) if state else None,
                "persistentVolumeClaim",
                "claimName",
            )
            if claim is None:
                errors.append(
                    f"[pvc] {where}: {STATE_DIRS[component]} must be a PersistentVolumeClaim"
                )
            for v in volumes.values():
                c = _dig(v, "persistentVolumeClaim", "claimName")
                if c is not None and c not in by_ns_kind.get((ns, "PersistentVolumeClaim"), ()):
                    errors.append(
                        f"[pvc] {where}: PersistentVolumeClaim {c!r} is not in the manifests"
                    )
            if component == "silo":
                for path in ("/data", "/models"):
                    m = mounts.get(path)
                    if m is None or not m.get("readOnly"):
                        errors.append(f"[pvc] {where}: {path} must be mounted read-only")

            # The config file: mounted from a rendered ConfigMap, consistent with the pod.
            cfg = mounts.get(config_path)
            cm_name = _dig(volumes.get(cfg.get("name")) if cfg else None, "configMap", "name")
            cm = configmaps.get((ns, cm_name))
            if cm is None:
                errors.append(f"[config] {where}: no ConfigMap mounted at {config_path}")
                continue
            key = cfg.get("subPath") or CONFIG_FILES[component]
            text = (cm.get("data") or {}).get(key)
            try:
                config = tomllib.loads(text or "")
            except tomllib.TOMLDecodeError:
                continue  # reported by check_configmaps
            errors += _config_errors(where, component, config, container, mounts)
    return errors


def _config_errors(
    where: str, component: str, config: Doc, container: Doc, mounts: dict[str, Doc]
) -> list[str]:
    """The TOML the daemon reads must agree with the pod it runs in."""
    errors = []
    for key in REQUIRED_CONFIG_KEYS[component]:
        if _toml_get(config, key) in (None, ""):
            errors.append(f"[config] {where}: {CONFIG_FILES[component]} lacks {key}")
    for key, file in zip(("tls.ca_file", "tls.cert_file", "tls.key_file"), TLS_FILES, strict=True):
        if _toml_get(config, key) not in (None, f"{TLS_DIR}/{file}"):
            errors.append(f"[config] {where}: {key} must be {TLS_DIR}/{file}")
    state_key = "storage.state_dir" if component == "coordinator" else "silo.state_dir"
    if _toml_get(config, state_key) not in (None, STATE_DIRS[component]):
        errors.append(f"[config] {where}: {state_key} must be {STATE_DIRS[component]}")
    ports = {p.get("containerPort") for p in container.get("ports") or []}
    listens = {"server.health_listen": HEALTH_PORT, "server.metrics_listen": METRICS_PORT}
    if component == "coordinator":
        listens |= {
            "server.silo_api_listen": SILO_API_PORT,
            "server.control_api_listen": CONTROL_API_PORT,
        }
    for key, port in listens.items():
        got = _port_of(_toml_get(config, key))
        if got is not None and (got != port or port not in ports):
            errors.append(f"[config] {where}: {key} listens on {got}; the pod declares {port}")
    if component == "silo":
        model = str(_toml_get(config, "model.path") or "")
        if model and not model.startswith("/models"):
            errors.append(f"[config] {where}: model.path must be under /models")
        for f in _toml_get(config, "data.train_files") or []:
            if not str(f).startswith("/data/"):
                errors.append(f"[config] {where}: data file {f} is not under /data")
        if _port_of(_toml_get(config, "coordinator.address")) is None:
            errors.append(f"[config] {where}: coordinator.address must be host:port")
    return errors


def check_federation(docs: list[Doc]) -> list[str]:
    """When coordinator and silos are rendered together (dev), their configs agree."""
    configs: dict[str, list[Doc]] = {"coordinator": [], "silo": []}
    for doc in docs:
        if doc.get("kind") != "ConfigMap":
            continue
        for component, file in CONFIG_FILES.items():
            text = (doc.get("data") or {}).get(file)
            if text:
                try:
                    configs[component].append(tomllib.loads(text))
                except tomllib.TOMLDecodeError:
                    pass
    if len(configs["coordinator"]) != 1 or not configs["silo"]:
        return []
    coord = configs["coordinator"][0]
    allowed = set(_toml_get(coord, "federation.allowed_silos") or [])
    errors = []
    for silo in configs["silo"]:
        sid = _toml_get(silo, "silo.id")
        if sid not in allowed:
            errors.append(f"[config] silo {sid!r} is not in the coordinator's allowed_silos")
        if _toml_get(silo, "silo.federation") != _toml_get(coord, "federation.name"):
            errors.append(f"[config] silo {sid!r} names another federation")
        if _port_of(_toml_get(silo, "coordinator.address")) != SILO_API_PORT:
            errors.append(f"[config] silo {sid!r} must dial the silo API port {SILO_API_PORT}")
    return errors


def check_services(docs: list[Doc]) -> list[str]:
    """A silo has no Service; only the silo API may be published outside the cluster."""
    errors = []
    silo_pods = _pods_of(docs, "silo")
    coord_pods = _pods_of(docs, "coordinator")
    for doc in docs:
        if doc.get("kind") != "Service":
            continue
        where = _where(doc)
        spec = doc.get("spec") or {}
        selector = spec.get("selector") or {}
        for workload, template in silo_pods:
            labels = _dig(template, "metadata", "labels") or {}
            if (
                _ns(workload) == _ns(doc)
                and selector
                and all(labels.get(k) == v for k, v in selector.items())
            ):
                errors.append(
                    f"[silo-service] {where} selects the silo {_where(workload)}: a "
                    "silo dials out and must not be reachable through a Service"
                )
        if selector.get("app.kubernetes.io/component") == "silo":
            errors.append(f"[silo-service] {where}: a Service for silos must not exist")
        targets_coordinator = any(
            _ns(w) == _ns(doc)
            and selector
            and all((_dig(t, "metadata", "labels") or {}).get(k) == v for k, v in selector.items())
            for w, t in coord_pods
        )
        allowed_targets = {"silo-api", SILO_API_PORT, "control-api", CONTROL_API_PORT}
        public = spec.get("type") in ("LoadBalancer", "NodePort") or spec.get("externalIPs")
        if public:
            allowed_targets = {"silo-api", SILO_API_PORT}
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            if targets_coordinator and target not in allowed_targets:
                scope = "published" if public else "exposed"
                errors.append(
                    f"[exposure] {where}: {scope} port {port.get('port')} -> {target}; "
                    "a coordinator Service carries only the silo API"
                    + ("" if public else " and the control API")
                )
    return errors


def _policies_for(docs: list[Doc], workload: Doc, template: Doc) -> list[Doc]:
    labels = _dig(template, "metadata", "labels") or {}
    return [
        d
        for d in docs
        if d.get("kind") == "NetworkPolicy"
        and _ns(d) == _ns(workload)
        and _selects(_dig(d, "spec", "podSelector"), labels)
    ]


def _ports(rule: Doc) -> list[tuple[Any, str]]:
    return [(p.get("port"), p.get("protocol", "TCP")) for p in rule.get("ports") or []]


def _cluster_only(peers: list[Doc]) -> bool:
    return bool(peers) and all("ipBlock" not in p for p in peers)


def _is_dns_rule(rule: Doc) -> bool:
    ports = _ports(rule)
    peers = rule.get("to") or []
    return (
        bool(ports)
        and all(port == 53 and proto in ("UDP", "TCP") for port, proto in ports)
        and bool(peers)
        and all(
            _dig(p, "podSelector", "matchLabels", "k8s-app") == "kube-dns"
            and _dig(p, "namespaceSelector", "matchLabels", "kubernetes.io/metadata.name")
            == "kube-system"
            for p in peers
        )
    )


def _narrow_ip_block(block: Doc) -> bool:
    try:
        net = ipaddress.ip_network(str(block.get("cidr")), strict=False)
    except ValueError:
        return False
    return net.prefixlen >= (24 if net.version == 4 else 48)


def _coordinator_rule_errors(where: str, rule: Doc, docs: list[Doc], ns: str | None) -> list[str]:
    """An egress rule that is not DNS must reach only the coordinator's silo API."""
    errors = []
    ports = _ports(rule)
    peers = rule.get("to") or []
    if not peers:
        errors.append(
            f"[silo-netpol] {where}: an egress rule without `to` allows every destination"
        )
    if not ports:
        errors.append(f"[silo-netpol] {where}: an egress rule without ports allows every port")
    for port, proto in ports:
        if port not in COORDINATOR_DIAL_PORTS or proto != "TCP":
            errors.append(
                f"[silo-netpol] {where}: egress to port {port}/{proto}; only the "
                f"coordinator's silo API ({sorted(COORDINATOR_DIAL_PORTS)}/TCP) is "
                "allowed besides DNS"
            )
    coord_labels = [
        _dig(t, "metadata", "labels") or {}
        for w, t in _pods_of(docs, "coordinator")
        if _ns(w) == ns
    ]
    for peer in peers:
        if "ipBlock" in peer:
            if not _narrow_ip_block(peer["ipBlock"]) or set(peer) != {"ipBlock"}:
                errors.append(
                    f"[silo-netpol] {where}: egress ipBlock {peer['ipBlock']} is wider "
                    "than the coordinator's address"
                )
        elif "podSelector" in peer and "namespaceSelector" not in peer:
            selector = peer["podSelector"]
            if _dig(selector, "matchLabels", "app.kubernetes.io/component") != "coordinator":
                errors.append(f"[silo-netpol] {where}: egress peer {peer} is not the coordinator")
            elif coord_labels and not any(_selects(selector, lab) for lab in coord_labels):
                errors.append(
                    f"[silo-netpol] {where}: egress peer {selector} matches no "
                    "coordinator pod in this namespace"
                )
        else:
            errors.append(
                f"[silo-netpol] {where}: egress peer {peer} is not the coordinator "
                "(use a podSelector in-cluster or an ipBlock for an external one)"
            )
    return errors


def check_network_policies(docs: list[Doc]) -> list[str]:
    """Every pod is covered; a silo's egress is DNS + the coordinator only; health and metrics
    are reachable from inside the cluster only."""
    errors = []
    for workload, template in _pod_templates(docs):
        where = _where(workload)
        component = _component(template)
        policies = _policies_for(docs, workload, template)
        if not policies:
            errors.append(f"[netpol] {where}: no NetworkPolicy selects its pods")
            continue
        types = {t for p in policies for t in _dig(p, "spec", "policyTypes") or []}
        needed = {"Ingress", "Egress"} if component == "silo" else {"Ingress"}
        if not needed <= types:
            errors.append(f"[netpol] {where}: policyTypes must include {sorted(needed)}")
        for policy in policies:
            pwhere = f"{_where(policy)} (for {where})"
            for rule in _dig(policy, "spec", "ingress") or []:
                ports = {port for port, _ in _ports(rule)}
                if not ports:
                    errors.append(f"[netpol] {pwhere}: an ingress rule without ports")
                open_ports = (
                    {SILO_API_PORT, CONTROL_API_PORT} if component == "coordinator" else set()
                )
                internal = ports - open_ports
                if internal - {HEALTH_PORT, METRICS_PORT}:
                    errors.append(
                        f"[netpol] {pwhere}: ingress to unexpected ports "
                        f"{sorted(internal - {HEALTH_PORT, METRICS_PORT})}"
                    )
                if internal and not _cluster_only(rule.get("from") or []):
                    errors.append(
                        f"[netpol] {pwhere}: health/metrics ports {sorted(internal)} "
                        "must admit in-cluster peers only (namespace/pod selectors)"
                    )
            if component == "silo":
                rules = _dig(policy, "spec", "egress") or []
                for rule in rules:
                    if not _is_dns_rule(rule):
                        errors += _coordinator_rule_errors(pwhere, rule, docs, _ns(workload))
        if component == "silo":
            egress = [r for p in policies for r in _dig(p, "spec", "egress") or []]
            if not any(_is_dns_rule(r) for r in egress):
                errors.append(f"[silo-netpol] {where}: no DNS egress rule (kube-dns, port 53)")
            if all(_is_dns_rule(r) for r in egress):
                errors.append(f"[silo-netpol] {where}: no egress rule to the coordinator")
    return errors


def check_namespaces_and_labels(docs: list[Doc]) -> list[str]:
    errors = []
    for doc in docs:
        where = _where(doc)
        labels = _dig(doc, "metadata", "labels") or {}
        if doc.get("kind") == "Namespace":
            if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
                errors.append(f"[labels] {where}: enforce the restricted Pod Security Standard")
            continue
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/component"):
            if key not in labels:
                errors.append(f"[labels] {where}: no {key} label")
    return errors


CHECKS = (
    check_no_secrets,
    check_configmaps,
    check_workloads,
    check_federation,
    check_services,
    check_network_policies,
    check_namespaces_and_labels,
)


def policy_errors(docs: list[Doc]) -> list[str]:
    return [e for check in CHECKS for e in check(docs)]


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
