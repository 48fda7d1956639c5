"""The Grafana dashboard of docker/grafana/ against the real service: every PromQL expression
parses (balanced brackets, known functions), and every metric it reads is one the running
service exports on /metrics; plus the Prometheus and provisioning files the compose stack mounts."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "recsys.json"
PROMETHEUS = ROOT / "docker" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

FUNCTIONS = {
    "sum", "avg", "max", "min", "count", "rate", "irate", "increase", "histogram_quantile",
    "topk", "bottomk", "clamp_min", "clamp_max", "time", "abs", "vector", "scalar",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_TOKEN = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*|\d+(?:\.\d+)?|[(){}\[\],/*+\-<>=!~]")


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects; raises ValueError on what does not parse
    (unbalanced brackets, an unknown function, a grouping clause without its label list)."""
    text = _STRING.sub('""', expr.replace("$__rate_interval", "5m"))
    text = re.sub(r"\[\s*\d+[smhdw]\s*\]", "", text)  # range selectors
    tokens = _TOKEN.findall(text)
    if "".join(tokens) != re.sub(r"\s+", "", text).replace('""', ""):
        raise ValueError(f"unexpected characters in {expr!r}")
    names: set[str] = set()
    depth = {"(": 0, "{": 0}
    closing = {")": "(", "}": "{"}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in depth:
            depth[token] += 1
        elif token in closing:
            depth[closing[token]] -= 1
            if depth[closing[token]] < 0:
                raise ValueError(f"unbalanced {token!r} in {expr!r}")
        elif depth["{"] > 0 or not re.match(r"[A-Za-z_:]", token):
            pass  # label matchers and numbers
        elif token in GROUPING:
            if following != "(":
                raise ValueError(f"{token} without its label list in {expr!r}")
            close = tokens.index(")", i + 1)
            i = close
        elif token in KEYWORDS:
            pass
        elif following == "(" or following in GROUPING:
            if token not in FUNCTIONS:
                raise ValueError(f"unknown function {token!r} in {expr!r}")
        else:
            names.add(token)
        i += 1
    if any(depth.values()):
        raise ValueError(f"unbalanced brackets in {expr!r}")
    return names


def test_the_expression_reader_finds_metrics_and_refuses_broken_queries() -> None:
    expr = 'sum by (le) (rate(a_bucket{x="by (y)"}[5m])) / sum(rate(b_total[5m]))'
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names("histogram_quantile(0.9, sum by (le, stage) (rate(c[1m])))") == {"c"}
    for broken in ("sum(rate(a[5m])", "sum by le (a)", "nosuchfn(a)", "a}"):
        with pytest.raises(ValueError):
            metric_names(broken)


@pytest.fixture
def exported(service_app, champion) -> set[str]:  # noqa: ANN001 - tests/serving fixtures
    """Sample names the real service exports once every route the dashboard reads was used."""
    import bentoml
    from prometheus_client.parser import text_string_to_metric_families
    from starlette.testclient import TestClient

    with TestClient(service_app) as client:
        service = bentoml.get_current_service()
        answer = client.post("/recommend", json={"user_id": "u1", "k": 3}).json()
        client.post("/recommend", json={"user_id": "u1", "k": 3})  # a cache hit
        now = time.time()
        events = [
            {
                "user_id": "u1",
                "item_id": answer["items"][0]["item_id"],
                "event_type": kind,
                "timestamp": now - i,
                "request_id": answer["request_id"],
                **({"value": 1} if kind == "purchase" else {}),
            }
            for i, kind in enumerate(("click", "add_to_cart", "purchase"))
        ]
        assert client.post("/events", json={"events": events}).status_code == 200
        service.impressions.flush()
        service.monitor.refresh()
        text = client.get("/metrics").text
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_every_dashboard_query_reads_metrics_the_service_exports(exported: set[str]) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    missing = sorted(used - exported)
    assert not missing, f"the dashboard reads metrics the service does not export: {missing}"
    # The panels: CTR by version, latency percentiles, cache hit rate, lag, age.
    for wanted in (
        "recsys_attributed_events_total",
        "bentoml_service_request_duration_seconds_bucket",
        "recsys_recommend_cache_total",
        "recsys_stream_consumer_lag",
        "recsys_model_age_seconds",
        "recsys_answers_served_total",
    ):
        assert wanted in used, wanted
    assert any("histogram_quantile" in e for e in exprs)


def test_prometheus_scrapes_the_recommender_and_grafana_reads_prometheus() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "recommender")
    assert job["metrics_path"] == "/metrics"
    serve = compose["recommender"]["command"]
    port = serve[serve.index("--port") + 1]
    assert job["static_configs"][0]["targets"] == [f"recommender:{port}"]
    source = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    uids = {
        target["datasource"]["uid"]
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel["targets"]
    }
    assert uids == {source["uid"]}
    mounts = compose["grafana"]["volumes"] + compose["prometheus"]["volumes"]
    for mount in mounts:
        source_path = mount.split(":")[0]
        if source_path.startswith("./"):
            assert (ROOT / source_path).exists(), mount
