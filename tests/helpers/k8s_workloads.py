"""Policies on rendered workloads that schemas cannot express: no secrets in manifests or
ConfigMaps, images, probes, resources, security contexts, and the federation's config.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from typing import Any

from tests.helpers.k8s import (
    CONFIG_FILES,
    CONTROL_API_PORT,
    HEALTH_PORT,
    METRICS_PORT,
    REQUIRED_CONFIG_KEYS,
    SECRET_NAME,
    SILO_API_PORT,
    STATE_DIRS,
    TLS_DIR,
    TLS_FILES,
    UID,
    Doc,
    _component,
    _dig,
    _ns,
    _pod_templates,
    _port_of,
    _toml_get,
    _where,
)


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
            if container.get("command") == ["torchrun"] and "-m" in args:
                # a silo of several processes: torchrun's options, then `-m pf2lora.cli.main`
                module = args[args.index("-m") + 1 : args.index("-m") + 2]
                args = args[args.index("-m") + 2 :] if module == ["pf2lora.cli.main"] else args
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
