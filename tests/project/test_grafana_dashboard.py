"""The shipped Grafana dashboard queries only metrics the daemons expose, and the dev overlay
provisions it. Metric names are read from the daemons' real registries (every series a
/metrics scrape can carry: counters' _total, histograms' _bucket/_sum/_count, info's _info),
so a renamed metric fails here rather than as an empty panel.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from pf2lora.coordinator.metrics import CoordinatorMetrics
from pf2lora.silo.metrics import SiloMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "k8s" / "components" / "grafana" / "pf2lora-dashboard.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}


def exposed_names() -> set[str]:
    names: set[str] = set()
    for registry in (CoordinatorMetrics().registry, SiloMetrics().registry):
        for family in registry.collect():
            names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"|\[[^\]]*\]|\{[^}]*\}', " ", expr)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_strings))
    return {w for w in words if w.startswith("pf2lora_")}


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_queried_metric_exists() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = exposed_names()
    assert "pf2lora_coordinator_rounds_completed_total" in exposed  # the registries were read
    assert "pf2lora_silo_answer_loss" in exposed
    exprs = queries(dashboard)
    assert len(exprs) >= 20
    used = set().union(*(metric_names(e) for e in exprs))
    assert used - exposed == set()
    # and every metric family the daemons expose has a panel
    families = {n for n in exposed if not n.endswith(("_created", "_sum", "_count"))}
    bases = {re.sub(r"_(total|bucket|info)$", "", n) for n in families}
    used_bases = {re.sub(r"_(total|bucket|info)$", "", n) for n in used}
    assert bases - used_bases == set()


def test_the_check_catches_a_renamed_metric() -> None:
    assert metric_names('sum(rate(pf2lora_silo_train_secs_bucket{silo="a"}[5m]))') == {
        "pf2lora_silo_train_secs_bucket"
    }
    assert "pf2lora_silo_train_secs_bucket" not in exposed_names()


def test_dashboard_shape() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "pf2lora-federation" and d["templating"]["list"][0]["type"] == "datasource"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]


def test_the_dev_overlay_provisions_the_dashboard() -> None:
    from tests.helpers.k8s import K8S, KUBECTL, render

    if KUBECTL is None and not os.environ.get("CI"):  # CI must run it (as the manifests tests)
        pytest.skip("kubectl renders deploy/k8s")
    (cm,) = [
        d
        for d in render(K8S / "overlays/dev")
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "pf2lora-grafana-dashboard"
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["pf2lora-dashboard.json"]) == json.loads(DASHBOARD.read_text())
