"""Policies on rendered Services, NetworkPolicies, namespaces and labels, and every policy check
at once (`policy_errors`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from tests.helpers.k8s import (
    CONTROL_API_PORT,
    COORDINATOR_DIAL_PORTS,
    HEALTH_PORT,
    METRICS_PORT,
    SILO_API_PORT,
    Doc,
    _component,
    _dig,
    _ns,
    _pod_templates,
    _pods_of,
    _selects,
    _where,
)
from tests.helpers.k8s_workloads import (
    check_configmaps,
    check_federation,
    check_no_secrets,
    check_workloads,
)


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
