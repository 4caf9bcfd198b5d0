"""The cluster page, /status.json and /metrics as resources (rendered in-process)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.web.test.requesthelper import DummyRequest

from skyproto import cli
from skyproto.mapper.server import MapperServerFactory
from skyproto.services import Echo
from skyproto.testing import InMemoryCluster
from skyproto.web import status
from skyproto.web.page import render_page
from skyproto.web.site import mapper_web, master_web, node_web


def get(web: Any, path: str, **headers: str) -> tuple[int, dict[str, str], str]:
    request = DummyRequest([part.encode() for part in path.lstrip("/").split("/")])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
    body = web.site.getResourceFor(request).render(request)
    assert isinstance(body, bytes)
    sent = {name.decode().lower(): values[0].decode()
            for name, values in request.responseHeaders.getAllRawHeaders()}
    return request.responseCode or 200, sent, body.decode()


def test_status_json_is_what_skyproto_status_json_prints() -> None:
    assert cli.status_object is status.status_object  # one function for both
    cluster = InMemoryCluster()
    cluster.add_node(1, [Echo()])
    cluster.add_node(2)
    assert cluster.master is not None
    code, headers, body = get(master_web(cluster.master, process=False), "/status.json")
    assert code == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == status.status_object(cluster.master.registry.snapshot())
    reply = json.loads(body)
    assert [h["name"] for h in reply["harbors"]] == ["n1@testing", "n2@testing"]
    assert reply["names"] == {"ECHO": 0x01000002}


def test_the_page_lists_harbors_and_names_and_refreshes_from_status_json() -> None:
    cluster = InMemoryCluster()
    cluster.add_node(1, [Echo()])
    cluster.add_node(2)
    assert cluster.master is not None
    code, headers, page = get(master_web(cluster.master, process=False), "/")
    assert code == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-store"
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td><td>([^<]*)</td>", page)
    assert rows == [("1", "n1@testing"), ("2", "n2@testing")]
    assert "loopback:h1-1" in page and ":01000002" in page and "ECHO" in page
    assert 'fetch("status.json"' in page and "setInterval(refresh, 2000)" in page
    assert "innerHTML" not in page  # the script writes text, never markup
    # the policy allows exactly the inline script and style it carries
    policy = headers["content-security-policy"]
    for tag in ("script", "style"):
        inline = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        assert inline is not None
        digest = base64.b64encode(hashlib.sha256(inline.group(1).encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_every_name_is_escaped() -> None:
    evil = "<script>alert(1)</script>"
    page = render_page({
        "harbors": [{"id": 1, "name": f"{evil}@h", "endpoint": "tcp:a&b:1\"'",
                     "incarnation": 5, "up": True, "up_since": 0.0}],
        "names": {f"N{evil}": 0x01000002}, "sequence": 3})
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@h" in page
    assert "tcp:a&amp;b:1&quot;&#x27;" in page
    assert "N&lt;script&gt;" in page
    assert "1970-01-01 00:00:00 UTC" in page


def test_an_empty_cluster_says_so() -> None:
    page = render_page({"harbors": [], "names": {}, "sequence": 0})
    assert '<table id="harbors" hidden>' in page
    assert '<p class="empty" id="harbors-empty">No harbor has joined.</p>' in page


def test_metrics_come_in_the_format_asked_for() -> None:
    cluster = InMemoryCluster()
    node = cluster.add_node(1, [Echo()])
    web = node_web(node, cluster.clock, process=False)
    code, headers, text = get(web, "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"skyproto_calls", "skyproto_pending_calls", "skyproto_node_info"} <= names
    code, headers, text = get(web, "/metrics",
                              accept="application/openmetrics-text; version=1.0.0")
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def test_daemons_without_the_page_link_to_what_they_serve() -> None:
    cluster = InMemoryCluster()
    node = cluster.add_node(1)
    for web in (node_web(node, cluster.clock, process=False),
                mapper_web(MapperServerFactory(cluster.clock, 4369), process=False)):
        code, _, page = get(web, "/")
        assert code == 200 and 'href="metrics"' in page and 'href="health"' in page
        request = DummyRequest([b"status.json"])
        web.site.getResourceFor(request).render(request)
        assert request.responseCode == 404
    # a standalone node runs the master: its / is the cluster page
    assert cluster.master is not None
    _, _, page = get(node_web(node, cluster.clock, master=cluster.master, process=False), "/")
    assert "n1@testing" in page


def test_the_page_lists_service_groups_escaped() -> None:
    from skyproto.web.page import render_page

    page = render_page({"harbors": [], "names": {}, "sequence": 1,
                        "groups": {"<workers>": [0x01000002, 0x02000002]}})
    assert "&lt;workers&gt;" in page and "<workers>" not in page
    assert ":01000002 :02000002" in page and 'id="groups-empty" hidden' in page
