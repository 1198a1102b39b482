"""deploy/grafana/chatprocessor-pipeline.json: a loadable dashboard whose queries name only
metrics the worker exports (a renamed metric would leave a panel silently empty)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

import chatprocessor.ops.metrics  # noqa: F401  (registers every metric)

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "chatprocessor-pipeline.json"
)
#: Identifiers that look like a metric of ours: seed 004's ai_* or the worker's chatprocessor_*.
METRIC_NAME = re.compile(r"\b(?:ai|chatprocessor)_[a-zA-Z0-9_]+")
#: Metrics the dashboard must show (the issue's list), as PromQL names.
REQUIRED = {
    "ai_processing_duration_seconds_bucket",
    "ai_tokens_used_total",
    "ai_cost_total",
    "ai_processing_errors_total",
    "ai_cache_hits_total",
    "ai_cache_misses_total",
    "ai_queue_depth",
    "ai_model_wait_seconds_bucket",
    "ai_rate_limited_total",
    "ai_budget_refused_total",
    "ai_budget_used_ratio",
    "ai_budget_alerts_total",
    "chatprocessor_messages_total",
    "chatprocessor_dead_letters_total",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def exported_names() -> set[str]:
    """Every series name the registry exposes: ``<name>_total`` for counters,
    ``<name>_bucket/_sum/_count`` for histograms, the name itself for gauges."""
    names: set[str] = set()
    for family in REGISTRY.collect():  # a family is listed even before its first sample
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones nested in collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query if isinstance(query, str) else query["query"])
    return exprs


def test_it_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert dashboard["uid"] == "chatprocessor-pipeline"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    tenant = variables["tenant"]
    assert tenant["type"] == "query"
    assert "label_values(ai_tokens_used_total, tenant_id)" in json.dumps(tenant["query"])
    assert tenant["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_a_unique_id_and_a_place(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["type"] in ("timeseries", "stat"), panel["title"]
            assert panel["targets"], f"{panel['title']} has no query"
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_metric_in_a_query_is_exported(dashboard: dict[str, Any]) -> None:
    exported = exported_names()
    used = {name for expr in expressions(dashboard) for name in METRIC_NAME.findall(expr)}
    assert used, "no metric found in the queries"
    unknown = used - exported
    assert not unknown, f"queries name metrics chatprocessor does not export: {sorted(unknown)}"
    missing = REQUIRED - used
    assert not missing, f"the dashboard lacks panels for {sorted(missing)}"


def test_the_name_check_catches_an_unknown_metric() -> None:
    """The check above would fail on a typo (guards the regex and the registry walk)."""
    exported = exported_names()
    assert "ai_tokens_used_total" in exported and "ai_model_wait_seconds_bucket" in exported
    assert "ai_queue_depth" in exported and "ai_tokens_used" not in exported  # counter: _total
    typo = 'sum(rate(ai_token_used_total{tenant_id=~"$tenant"}[5m]))'
    assert set(METRIC_NAME.findall(typo)) - exported == {"ai_token_used_total"}


def test_panels_filtered_by_tenant_use_the_variable(dashboard: dict[str, Any]) -> None:
    """Every query on a tenant-labelled metric honours the tenant picker."""
    tenant_metrics = re.compile(
        r"\bai_(?:processing_duration|tokens_used|cost|processing_errors|cache_hits|"
        r"cache_misses|rate_limited|budget_refused|budget_used_ratio|budget_alerts)\w*"
    )
    for expr in (t["expr"] for p in panels(dashboard) for t in p.get("targets", [])):
        for match in tenant_metrics.finditer(expr):
            assert expr[match.end() :].startswith('{tenant_id=~"$tenant"'), expr
