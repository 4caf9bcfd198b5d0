"""The live cluster page (``/`` on a master's ``--http``) and ``/status.json``.

The page is rendered on the server from the master's table, so it is complete without
JavaScript; a small inline script then fetches ``status.json`` (the same object as
``skyproto status --json``) every 2 seconds and re-renders the tables with ``textContent``
(never as HTML). The server escapes every name it writes. A Content-Security-Policy allows
that one script (by its hash), the one style sheet, and requests to this origin only.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from html import escape
from typing import Any, Final

from twisted.web.resource import Resource
from twisted.web.server import Request

from ..address import format_handle
from ..master.registry import Table
from .headers import set_headers
from .status import status_object

__all__ = ["REFRESH_SECONDS", "ClusterPage", "IndexPage", "StatusResource", "render_page"]

#: how often the page fetches ``status.json``
REFRESH_SECONDS: Final = 2

_STYLE: Final = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em; color: #1d2330; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 .2em; }
h2 { font-size: 1.1em; margin: 1.6em 0 .4em; }
#summary { color: #555; margin: 0; }
#updated.stale { color: #b00020; font-weight: 600; }
table { border-collapse: collapse; min-width: 40em; }
th, td { text-align: left; padding: .35em .9em .35em 0; border-bottom: 1px solid #e3e6ec; }
th { font-weight: 600; color: #555; }
td.num { font-variant-numeric: tabular-nums; }
code, td.mono { font-family: ui-monospace, monospace; font-size: .93em; }
p.empty { color: #777; font-style: italic; }
"""

_SCRIPT: Final = """
(function () {
  "use strict";
  function hex(handle) { return ":" + ("0000000" + handle.toString(16)).slice(-8); }
  function since(seconds) {
    return new Date(seconds * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }
  function row(body, cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (cell) {
      var td = document.createElement("td");
      td.textContent = String(cell[0]);
      if (cell[1]) { td.className = cell[1]; }
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
  function fill(id, rows) {
    var table = document.getElementById(id);
    var body = document.createElement("tbody");
    rows.forEach(function (cells) { row(body, cells); });
    table.replaceChild(body, table.tBodies[0]);
    table.hidden = rows.length === 0;
    document.getElementById(id + "-empty").hidden = rows.length !== 0;
  }
  function render(status) {
    fill("harbors", status.harbors.map(function (h) {
      return [[h.id, "num"], [h.name, ""], [h.endpoint, "mono"], [h.incarnation, "num"],
              [since(h.up_since), "num"]];
    }));
    var names = Object.keys(status.names).sort();
    fill("names", names.map(function (name) {
      var handle = status.names[name];
      return [[name, "mono"], [hex(handle), "mono"], [Math.floor(handle / 16777216), "num"]];
    }));
    var groups = Object.keys(status.groups || {}).sort();
    fill("groups", groups.map(function (group) {
      return [[group, "mono"], [status.groups[group].map(hex).join(" "), "mono"],
              [status.groups[group].length, "num"]];
    }));
    document.getElementById("count-harbors").textContent = String(status.harbors.length);
    document.getElementById("count-names").textContent = String(names.length);
    document.getElementById("sequence").textContent = String(status.sequence);
    var updated = document.getElementById("updated");
    updated.textContent = "updated " + new Date().toLocaleTimeString();
    updated.className = "";
    document.body.setAttribute("data-rendered", "live");
  }
  function refresh() {
    fetch("status.json", {cache: "no-store"}).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.json();
    }).then(render, function (error) {
      var updated = document.getElementById("updated");
      updated.textContent = "cannot reach the master's page: " + error.message;
      updated.className = "stale";
    });
  }
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
""".replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))


def _digest(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


_POLICY: Final = (f"default-src 'none'; script-src '{_digest(_SCRIPT)}'; "
                  f"style-src '{_digest(_STYLE)}'; connect-src 'self'; img-src 'self'; "
                  f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'").encode()


def _since(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cells(cells: list[tuple[object, str]]) -> str:
    return "".join(f'<td class="{kind}">{escape(str(value))}</td>' if kind
                   else f"<td>{escape(str(value))}</td>" for value, kind in cells)


def render_page(status: dict[str, Any], title: str = "skyproto cluster") -> str:
    """The whole page for one ``status_object``: every value escaped."""
    harbors = "".join(
        "<tr>" + _cells([(h["id"], "num"), (h["name"], ""), (h["endpoint"], "mono"),
                         (h["incarnation"], "num"), (_since(h["up_since"]), "num")]) + "</tr>"
        for h in status["harbors"])
    names = "".join(
        "<tr>" + _cells([(name, "mono"), (format_handle(handle), "mono"),
                         (handle >> 24, "num")]) + "</tr>"
        for name, handle in sorted(status["names"].items()))
    group_table = status.get("groups", {})
    groups = "".join(
        "<tr>" + _cells([(group, "mono"), (" ".join(format_handle(h) for h in members), "mono"),
                         (len(members), "num")]) + "</tr>"
        for group, members in sorted(group_table.items()))
    no_harbors = "" if status["harbors"] else " hidden"
    no_names = "" if status["names"] else " hidden"
    no_groups = "" if group_table else " hidden"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body data-rendered="server">
<h1>{escape(title)}</h1>
<p id="summary"><span id="count-harbors">{len(status["harbors"])}</span> harbors,
<span id="count-names">{len(status["names"])}</span> global names, table sequence
<span id="sequence">{status["sequence"]}</span>; <span id="updated">as served</span>
(refreshes every {REFRESH_SECONDS} s)</p>
<h2>Harbors</h2>
<table id="harbors"{no_harbors}>
<thead><tr><th>harbor</th><th>node</th><th>endpoint</th><th>incarnation</th><th>up since</th>
</tr></thead>
<tbody>{harbors}</tbody>
</table>
<p class="empty" id="harbors-empty"{"" if no_harbors else " hidden"}>No harbor has joined.</p>
<h2>Global names</h2>
<table id="names"{no_names}>
<thead><tr><th>name</th><th>handle</th><th>harbor</th></tr></thead>
<tbody>{names}</tbody>
</table>
<p class="empty" id="names-empty"{"" if no_names else " hidden"}>No global names.</p>
<h2>Service groups</h2>
<table id="groups"{no_groups}>
<thead><tr><th>group</th><th>members</th><th>count</th></tr></thead>
<tbody>{groups}</tbody>
</table>
<p class="empty" id="groups-empty"{"" if no_groups else " hidden"}>No service groups.</p>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _no_cache(request: Request, content_type: bytes, policy: bytes | None = None) -> None:
    set_headers(request, content_type=content_type, cache_control=b"no-store",
                x_content_type_options=b"nosniff")
    if policy is not None:
        set_headers(request, content_security_policy=policy)


class ClusterPage(Resource):
    """``/``: the page, from ``table()`` (the master's registry snapshot) at each request."""

    isLeaf = True

    def __init__(self, table: Callable[[], Table]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.table = table

    def render_GET(self, request: Request) -> bytes:
        """The cluster page: the master's table as HTML."""
        _no_cache(request, b"text/html; charset=utf-8", _POLICY)
        return render_page(status_object(self.table())).encode("utf-8")


class StatusResource(Resource):
    """``/status.json``: exactly what ``skyproto status --json`` prints."""

    isLeaf = True

    def __init__(self, table: Callable[[], Table], store: str = "memory") -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.table = table
        self.store = store

    def render_GET(self, request: Request) -> bytes:
        """The master's table as ``skyproto status --json`` prints it."""
        _no_cache(request, b"application/json")
        return json.dumps(status_object(self.table(), self.store)).encode("utf-8") + b"\n"


class IndexPage(Resource):
    """``/`` on a daemon without the cluster page: where to look instead."""

    isLeaf = True

    def __init__(self, what: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.what = what

    def render_GET(self, request: Request) -> bytes:
        """A short page linking to ``/metrics`` and ``/health``."""
        _no_cache(request, b"text/html; charset=utf-8", b"default-src 'none'")
        what = escape(self.what)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f"<title>{what}</title></head><body><h1>{what}</h1><ul>"
                f'<li><a href="metrics">/metrics</a> (Prometheus)</li>'
                f'<li><a href="health">/health</a></li></ul>'
                f"<p>The cluster page is on the master's --http.</p></body></html>\n"
                ).encode()
