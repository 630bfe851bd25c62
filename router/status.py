"""The node's HTTP listener: /metrics (Prometheus), / (a read-only status page), /healthz.

Off unless ``[status] enabled = true``; binds loopback unless told otherwise. Serves only
what NodeMetrics holds: counts, states and PHI-free error texts, all HTML-escaped.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from router.metrics import NodeMetrics

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>deid-router status</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}td.n{{text-align:right}}
.down{{color:#b00}}.up{{color:#070}}</style></head><body>
<h1>deid-router</h1><p>up for {uptime} s &middot; <a href="/metrics">/metrics</a></p>
<h2>Instances</h2><table><tr><th>figure</th><th>value</th></tr>{totals}</table>
<h2>Destinations</h2><table><tr><th>destination</th><th>state</th><th>since</th><th>forwarded</th>
<th>retried</th><th>quarantined</th><th>queued</th><th>detail</th></tr>{destinations}</table>
<h2>Queues</h2><table><tr><th>stage</th><th>instances</th></tr>{queues}</table>
<h2>Last errors</h2><table><tr><th>time</th><th>stage</th><th>error</th></tr>{errors}</table>
</body></html>
"""

TOTALS = (
    ("received", "deid_router_instances_received_total"),
    ("de-identified", "deid_router_instances_deidentified_total"),
    ("forwarded", "deid_router_instances_forwarded_total"),
    ("retried", "deid_router_instances_retried_total"),
    ("quarantined", "deid_router_instances_quarantined_total"),
    ("refused at receive", "deid_router_instances_refused_total"),
    ("pixel regions masked", "deid_router_pixel_regions_masked_total"),
    ("spool bytes", "deid_router_spool_bytes"),
    ("associations open", "deid_router_associations_open"),
)


def render_page(metrics: NodeMetrics) -> str:
    snap = metrics.snapshot()
    values = snap["values"]

    def total(name: str, **match: str) -> int:
        return int(sum(v for (n, labels), v in values.items()
                       if n == name and all(dict(labels).get(k) == m for k, m in match.items())))

    def cell(value, name: str, **labels: str) -> str:
        attrs = "".join(f' data-{k}="{html.escape(v)}"' for k, v in labels.items())
        return f'<td class="n" data-metric="{name}"{attrs}>{value}</td>'

    e = html.escape
    totals = "".join(f"<tr><td>{e(label)}</td>{cell(total(name), name)}</tr>" for label, name in TOTALS)
    destinations = []
    for dest, (state, detail, since) in snap["destinations"].items():
        destinations.append(
            f'<tr><td>{e(dest)}</td><td class="{"up" if state == "up" else "down"}" data-state="{e(dest)}">'
            f"{e(state)}</td><td>{e(since or '')}</td>"
            + cell(total("deid_router_instances_forwarded_total", destination=dest),
                   "deid_router_instances_forwarded_total", destination=dest)
            + cell(total("deid_router_instances_retried_total", destination=dest),
                   "deid_router_instances_retried_total", destination=dest)
            + cell(total("deid_router_instances_quarantined_total", where=dest),
                   "deid_router_instances_quarantined_total", destination=dest)
            + cell(total("deid_router_queue_depth", stage=f"outgoing/{dest}"), "deid_router_queue_depth",
                   stage=f"outgoing/{dest}")
            + f"<td>{e(detail or '')}</td></tr>")
    queues = "".join(f"<tr><td>{e(dict(labels)['stage'])}</td>"
                     f"{cell(int(v), 'deid_router_queue_depth', stage=dict(labels)['stage'])}</tr>"
                     for (n, labels), v in sorted(values.items()) if n == "deid_router_queue_depth")
    errors = "".join(f"<tr><td>{e(t)}</td><td>{e(stage)}</td><td>{e(message)}</td></tr>"
                     for t, stage, message in reversed(snap["errors"])) or '<tr><td colspan="3">none</td></tr>'
    return PAGE.format(uptime=int(snap["uptime_seconds"]), totals=totals, destinations="".join(destinations),
                       queues=queues, errors=errors)


class StatusServer:
    """A ThreadingHTTPServer on a daemon thread."""

    def __init__(self, metrics: NodeMetrics, bind: str, port: int, health: Callable[[], tuple[bool, str]]):
        self.metrics = metrics
        self.health = health
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, server.metrics.render_prometheus(), "text/plain; version=0.0.4; charset=utf-8")
                elif path == "/healthz":
                    ok, why = server.health()
                    self._send(200 if ok else 503, why + "\n", "text/plain; charset=utf-8")
                elif path == "/":
                    self._send(200, render_page(server.metrics), "text/html; charset=utf-8")
                else:
                    self._send(404, "not found\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: str, content_type: str) -> None:
                data = body.encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass  # scrapes every few seconds: not worth a log line each

        self._httpd = ThreadingHTTPServer((bind, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="status-http", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> int:
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
