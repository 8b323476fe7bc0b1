"""The monitoring files of `deploy/monitoring/` and a throw-away Prometheus server for tests.

- `rule_expressions()`, `dashboard_expressions()`: every PromQL expression the alert rules and the
  Grafana dashboard hold; `metric_names(expr)` the metric names one expression reads.
- `exported_names(text)`: the sample names a `/metrics` page declares (counters with `_total`,
  histograms with `_bucket`/`_sum`/`_count`), whether or not a labelled series has a sample yet.
- `run_prometheus(dir, config)`: Debian's `prometheus` on 127.0.0.1 with its own data directory,
  killed on exit; `query()` and `alerts()` ask its HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from kins_tunnel.testing.support import free_port, http_get, wait_until

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

# PromQL words that are not metric names: operators, modifiers, aggregations and functions (these
# are followed by "(" and never reach the name check), and the duration/number forms.
_KEYWORDS = frozenset(
    "and or unless by without on ignoring group_left group_right offset bool inf nan".split()
)
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana's `$variables` allowed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = _LABEL_LISTS.sub("", text)  # by (...), on (...), group_left (...)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # dashboard variables
    names = set()
    for m in _IDENT.finditer(text):
        word, rest = m.group(), text[m.end() :].lstrip()
        before = text[: m.start()]
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # the unit of a duration (5m) or an exponent
        names.add(word)
    return names


def load_rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    return doc


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    return doc


def rule_expressions() -> dict[str, str]:
    """Alert (or record) name -> expression, for every rule of rules.yaml."""
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in load_rules()["groups"]
        for rule in group["rules"]
    }


def recorded_names() -> set[str]:
    """The series the recording rules of rules.yaml write (no process exports them)."""
    return {
        rule["record"]
        for group in load_rules()["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def dashboard_panels(doc: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    for panel in (doc or load_dashboard())["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_expressions() -> dict[str, str]:
    """ "panel title / refId" -> expression of every panel target, and "variable NAME" -> the
    metric selector of every `label_values(...)` variable."""
    doc = load_dashboard()
    out = {
        f"{panel['title']} / {t['refId']}": t["expr"]
        for panel in dashboard_panels(doc)
        for t in panel.get("targets", [])
    }
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), *\w+\)", var["query"]["query"])
            assert m, f"variable {var['name']}: expected label_values(selector, label)"
            out[f"variable {var['name']}"] = m.group(1)
    return out


def exported_names(text: str) -> set[str]:
    """Sample names declared by a Prometheus text page (its families and their suffixes)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


# ---------------------------------------------------------------- a real Prometheus


@contextlib.asynccontextmanager
async def run_prometheus(directory: Path, config: dict[str, Any]) -> AsyncIterator[int]:
    """Run `prometheus` with `config` (rule files relative to `directory`), its data in
    `directory`/data, on a free 127.0.0.1 port; yields the port once it is ready."""
    assert PROMETHEUS is not None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(directory / "prometheus.log", "ab")
    popen = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=directory,
    )
    log.close()
    try:

        async def ready() -> bool:
            assert popen.poll() is None, f"prometheus exited: {tail(directory)}"
            try:
                return (await http_get(port, "/-/ready"))[0] == 200
            except OSError:
                return False

        await wait_until(ready, 30, "prometheus ready", interval=0.1)
        yield port
    finally:
        popen.kill()
        popen.wait(10)


def tail(directory: Path, lines: int = 30) -> str:
    try:
        text = (directory / "prometheus.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


async def api(port: int, path: str, **params: str) -> Any:
    """GET /api/v1/<path> and return its `data` (AssertionError unless status is success)."""
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    status, body = await http_get(port, f"/api/v1/{path}{query}")
    doc = json.loads(body)
    assert status == 200 and doc.get("status") == "success", f"{path} {params}: {body[:500]!r}"
    return doc["data"]


async def query(port: int, expr: str) -> list[dict[str, Any]]:
    data = await api(port, "query", query=expr)
    result: list[dict[str, Any]] = data["result"]
    return result


async def alerts(port: int) -> list[dict[str, Any]]:
    """Every pending or firing alert: labels, state, value."""
    data = await api(port, "alerts")
    result: list[dict[str, Any]] = data["alerts"]
    return result
