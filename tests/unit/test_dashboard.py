"""The Grafana dashboard (deploy/grafana/dashboards/duopool.json), its provisioning and the Prometheus scrape
config (deploy/prometheus.yml) agree with Grafana's dashboard schema, with the metrics of
duopool/common/metrics.py and with the compose services of duopool/topology.py.

Grafana's schema: the dashboard is parsed with the models of ``grafana-foundation-sdk`` (Grafana's Python
SDK, generated from Grafana's own dashboard and panel schemas, the 11.4 release like the compose image):
every key must survive a parse and re-encode (a key the schema lacks is dropped) and every value must have
the type the schema gives it. A strict structural check runs without the SDK too.
"""

from __future__ import annotations

import enum
import json
import pathlib
import re
import shutil
import subprocess
import types
import typing

import pytest

from duopool.common.metrics import METRICS, SERVICE_OF, exposed_name
from duopool.topology import Topology, compose_services

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "duopool.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# Grafana's builtin panel plugins (public/app/plugins/panel of Grafana 11), plus the row.
BUILTIN_PANELS = {
    "alertlist", "annolist", "barchart", "bargauge", "candlestick", "canvas", "dashlist", "datagrid", "debug",
    "flamegraph", "gauge", "geomap", "heatmap", "histogram", "logs", "news", "nodeGraph", "piechart", "stat",
    "state-timeline", "status-history", "table", "text", "timeseries", "traces", "trend", "xychart", "row",
}
SDK = "grafana_foundation_sdk."  # the modules of the SDK's models
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
METRIC_RE = re.compile(r"\bduopool_\w+")
BY_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHERS_RE = re.compile(r"\b(duopool_\w+)\{([^}]*)\}")
LABEL_RE = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(doc: dict) -> list[dict]:
    """Every panel, rows' nested (collapsed) panels included."""
    out = []
    for p in doc["panels"]:
        out.append(p)
        out += p.get("panels", []) if p["type"] == "row" else []
    return out


def data_panels(doc: dict) -> list[dict]:
    return [p for p in all_panels(doc) if p["type"] != "row"]


def exposed() -> dict[str, object]:
    """{name a scrape shows: metric}. Histograms show only _bucket, _sum and _count series."""
    out = {}
    for m in METRICS:
        names = [exposed_name(m) + s for s in ("_bucket", "_sum", "_count")] if m._type == "histogram" \
            else [exposed_name(m)]
        out.update(dict.fromkeys(names, m))
    return out


def labels_of(name: str) -> set[str]:
    m = exposed()[name]
    return set(m._labelnames) | ({"le"} if name.endswith("_bucket") else set())


def queries(doc: dict) -> list[tuple[str, str, str]]:
    """(where, PromQL, legendFormat) of every panel target and every query variable."""
    out = [(f"panel {p['id']} {p['title']!r}", t["expr"], t.get("legendFormat", ""))
           for p in data_panels(doc) for t in p.get("targets", [])]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q, ""))
    return out


# -- (a) Grafana's dashboard schema ---------------------------------------------------------------------------

def test_dashboard_structure():
    doc = dashboard()
    for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list), ("time", dict),
                      ("templating", dict), ("annotations", dict)):
        assert isinstance(doc.get(key), kind), f"dashboard.{key} must be a {kind.__name__}"
    assert 36 <= doc["schemaVersion"] <= 41, "a schemaVersion of Grafana 10/11"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", doc["uid"])
    assert {"from", "to"} <= set(doc["time"])
    ids = [p.get("id") for p in all_panels(doc)]
    assert all(isinstance(i, int) and not isinstance(i, bool) for i in ids), "every panel needs an integer id"
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], int] = {}
    for p in all_panels(doc):
        assert p["type"] in BUILTIN_PANELS, f"panel {p['id']}: {p['type']!r} is not a builtin Grafana panel"
        assert p.get("title"), f"panel {p['id']} has no title"
        g = p["gridPos"]
        assert set(g) >= {"h", "w", "x", "y"} and all(isinstance(g[k], int) for k in "hwxy"), p["id"]
        assert g["h"] >= 1 and 1 <= g["w"] <= 24 and g["x"] >= 0 and g["y"] >= 0, p["id"]
        assert g["x"] + g["w"] <= 24, f"panel {p['id']} runs past the 24 grid columns"
        if p["type"] == "row":
            assert (g["x"], g["w"], g["h"]) == (0, 24, 1), f"row {p['id']} must span the grid"
            assert isinstance(p.get("collapsed"), bool) and isinstance(p.get("panels"), list)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap at {(x, y)}"
                cells[(x, y)] = p["id"]
    for p in data_panels(doc):
        assert p.get("datasource") == DATASOURCE, f"panel {p['id']}: datasource must be {DATASOURCE}"
        targets = p.get("targets") or []
        assert targets, f"panel {p['id']} {p['title']!r} has no target"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"panel {p['id']}: refIds must be set and unique"
        for t in targets:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), f"panel {p['id']}: empty expr"
            assert t.get("datasource", DATASOURCE) == DATASOURCE, p["id"]
    for v in doc["templating"]["list"]:
        assert v.get("name") and v.get("type"), v
        if v["type"] == "query":
            assert v.get("datasource") == DATASOURCE, v["name"]


def _type_errors(value, hint, path: str) -> list[str]:
    """Where ``value`` (as parsed by the SDK) does not have the schema's type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (typing.Any, object):  # panel options and custom field config: the panel type's own model
        return _model_errors(value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return []
        models = [a for a in args if isinstance(a, type) and type(value).__module__.startswith(SDK)
                  and isinstance(value, a)]
        tries = [_type_errors(value, a, path) for a in (models or args) if a is not type(None)]
        return [] if any(not t for t in tries) else min(tries, key=len)
    if origin is typing.Literal:
        return [] if value in args else [f"{path}: {value!r} is not one of {args}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: {type(value).__name__} is not a list"]
        return [e for i, v in enumerate(value) for e in _type_errors(v, args[0] if args else object, f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: {type(value).__name__} is not an object"]
        return [e for k, v in value.items() for e in _type_errors(v, args[1] if args else object, f"{path}.{k}")]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            hint(value)
        except ValueError:
            return [f"{path}: {value!r} is not one of {[e.value for e in hint]}"]
        return []
    if hint is bool:
        return [] if isinstance(value, bool) else [f"{path}: {value!r} is not a boolean"]
    if hint in (int, float):
        ok = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r} is not a{'n integer' if hint is int else ' number'}"]
    if hint is str:
        return [] if isinstance(value, str) else [f"{path}: {value!r} is not a string"]
    if isinstance(hint, type):
        if not isinstance(value, hint):
            return [f"{path}: {type(value).__name__} is not a {hint.__name__}"]
        return _model_errors(value, path)
    return []


def _model_errors(obj, path: str) -> list[str]:
    """The type errors of one SDK model object (its fields' values against the schema's field types)."""
    if not type(obj).__module__.startswith(SDK):
        return []
    if type(obj).__name__ == "UnknownDataquery":
        return [f"{path}: a target of an unknown datasource type"]
    hints = typing.get_type_hints(type(obj))
    return [e for name, hint in hints.items() for e in _type_errors(getattr(obj, name, None), hint, f"{path}.{name}")]


def _lost(orig, back, path: str = "$") -> list[str]:
    """The keys and values of ``orig`` a parse and re-encode did not keep (``back`` may add defaults)."""
    if isinstance(orig, dict):
        if not isinstance(back, dict):
            return [f"{path}: not an object after parsing"]
        return [e for k, v in orig.items()
                for e in (_lost(v, back[k], f"{path}.{k}") if k in back
                          else [] if v is None else [f"{path}.{k}: not in Grafana's schema"])]
    if isinstance(orig, list):
        if not isinstance(back, list) or len(back) != len(orig):
            return [f"{path}: list changed by parsing"]
        return [e for i, (a, b) in enumerate(zip(orig, back, strict=True)) for e in _lost(a, b, f"{path}[{i}]")]
    return [] if orig == back and type(orig) is type(back) or (
        isinstance(orig, (int, float)) and not isinstance(orig, bool) and orig == back) \
        else [f"{path}: {orig!r} became {back!r}"]


def test_dashboard_matches_grafanas_schema():
    sdk = pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk (the dev extra) missing")
    from grafana_foundation_sdk.cog import runtime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    assert sdk.__name__
    register_default_plugins()
    known = set(runtime.Runtime().panelcfg_variants) | {"row"}
    doc = dashboard()
    for p in all_panels(doc):
        assert p["type"] in known, f"panel {p['id']}: no Grafana schema for panel type {p['type']!r}"
    parsed = Dashboard.from_json(doc)
    errors = _model_errors(parsed, "dashboard")
    assert not errors, "types against Grafana's dashboard schema:\n" + "\n".join(errors)
    back = json.loads(json.dumps(parsed, cls=JSONEncoder))
    lost = _lost(doc, back)
    assert not lost, "not in Grafana's dashboard schema:\n" + "\n".join(lost)


def test_the_schema_check_catches_mistakes():
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk (the dev extra) missing")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    doc = dashboard()
    panel = data_panels(doc)[0]
    panel["gridpos"] = panel.pop("gridPos")  # a misspelt key
    panel["targets"][0]["legendFormat"] = 3  # a wrong type
    doc["graphTooltip"] = 7  # not a DashboardCursorSync
    parsed = Dashboard.from_json(doc)
    errors = _model_errors(parsed, "dashboard")
    assert any("legend_format" in e for e in errors) and any("graph_tooltip" in e for e in errors), errors
    assert any(".gridpos" in e for e in _lost(doc, json.loads(json.dumps(parsed, cls=JSONEncoder))))


# -- (b) every query names metrics and labels that exist ----------------------------------------------------

def test_every_query_names_only_exposed_metrics():
    names = exposed()
    doc = dashboard()
    for p in data_panels(doc):
        assert p.get("targets"), f"panel {p['id']} {p['title']!r} has no target"
    for where, expr, _legend in queries(doc):
        used = METRIC_RE.findall(expr)
        assert used, f"{where}: {expr!r} names no duopool metric"
        unknown = sorted(set(used) - set(names))
        assert not unknown, f"{where}: {unknown} are not exposed by duopool/common/metrics.py"


def test_every_query_uses_labels_its_metrics_have():
    doc = dashboard()
    for where, expr, legend in queries(doc):
        metrics = set(METRIC_RE.findall(expr))
        have = set().union(*(labels_of(n) for n in metrics)) | SCRAPE_LABELS
        for name, matchers in MATCHERS_RE.findall(expr):
            bad = set(LABEL_RE.findall(matchers)) - labels_of(name) - SCRAPE_LABELS
            assert not bad, f"{where}: {name} has no label {sorted(bad)}"
        for group in BY_RE.findall(expr):
            bad = {x.strip() for x in group.split(",") if x.strip()} - have
            assert not bad, f"{where}: grouped by {sorted(bad)}, which {sorted(metrics)} lack"
        bad = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) - have
        assert not bad, f"{where}: legend names {sorted(bad)}, which {sorted(metrics)} lack"
        m = re.fullmatch(r"label_values\((duopool_\w+),\s*(\w+)\)", expr)
        if where.startswith("variable"):
            assert m and m.group(2) in labels_of(m.group(1)), f"{where}: {expr!r}"


def test_every_panel_query_is_promql(tmp_path):
    """Prometheus' own parser (promtool, where installed) reads every panel expression as a recording rule."""
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool (Prometheus) not installed")
    exprs = [e for where, e, _l in queries(dashboard()) if where.startswith("panel")]
    rules = tmp_path / "rules.yml"
    rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": [
        {"record": f"duopool:dashboard_{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_histograms_are_read_through_quantiles_of_bucket_rates():
    doc = dashboard()
    for where, expr, _legend in queries(doc):
        for name in METRIC_RE.findall(expr):
            if name.endswith("_bucket"):
                assert "histogram_quantile(" in expr and re.search(rf"rate\({name}\b", expr), (where, expr)
                assert re.search(r"by \([^)]*\ble\b", expr), f"{where}: keep `le` when summing buckets"


def test_the_dashboard_shows_what_it_is_for():
    used = {n for _w, expr, _l in queries(dashboard()) for n in METRIC_RE.findall(expr)}
    for name in ("duopool_slo_requests_total", "duopool_ttft_seconds_bucket", "duopool_tpot_seconds_bucket",
                 "duopool_offline_tokens_total", "duopool_offline_requests_total", "duopool_preemptions_total",
                 "duopool_preemption_seconds_bucket", "duopool_worker_running_requests",
                 "duopool_worker_waiting_requests", "duopool_worker_kv_usage_ratio", "duopool_inflight_requests",
                 "duopool_slo_pressure_ratio", "duopool_engine_step_seconds_bucket", "duopool_kv_transfers_total",
                 "duopool_kv_transfer_bytes_total", "duopool_kv_parked_bytes", "duopool_role_changes_total",
                 "duopool_requests_total"):
        assert name in used, f"the dashboard lost {name}"


# -- (c) the scrape config and provisioning match the compose services -------------------------------------

def _compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_scrape_target_is_a_compose_service_metrics_port():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    compose = _compose()
    specs = {s.name: s for s in compose_services(Topology())}
    seen: dict[str, str] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics").rstrip("/") == "/metrics", job["job_name"]
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in specs and host in compose["services"], f"{target}: not a compose service"
                spec = specs[host]
                assert job["job_name"] == spec.service, f"{target} belongs to job {spec.service}"
                want = spec.flags["http-port"] if spec.service == "router" else spec.flags["metrics-port"]
                assert port == want, f"{target}: {host} serves /metrics on {want}"
                command = compose["services"][host]["command"]
                flag = "--http-port" if spec.service == "router" else "--metrics-port"
                assert command[command.index(flag) + 1] == port, f"{host}'s compose command uses another port"
                assert target not in seen, f"{target} scraped twice"
                seen[target] = job["job_name"]
    assert {t.rsplit(":", 1)[0] for t in seen} == set(specs), "every compose service must be scraped"
    assert set(SERVICE_OF) <= set(seen.values()), "every service that updates metrics must be scraped"


def test_prometheus_and_grafana_are_wired_in_compose():
    yaml = pytest.importorskip("yaml")
    services = _compose()["services"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]
    assert "prometheus" in grafana["depends_on"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-admin}"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert all(v.endswith(":ro") for v in grafana["volumes"])
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == PROVISIONING
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())["datasources"]
    prom = next(d for d in datasources if d["uid"] == DATASOURCE["uid"])
    assert prom["type"] == DATASOURCE["type"] and prom["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "duopool.yaml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    assert providers[0]["type"] == "file" and path in mounts
    assert (ROOT / mounts[path]).resolve() == DASHBOARD.parent
