"""Metrics and the status page: Prometheus exposition, HTTP endpoints, and the page as
headless Chromium renders it after a real transfer (storescu -> router -> folder)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from peers import free_port, send_files
from router.metrics import BUCKETS, NodeMetrics, Probe
from router.status import StatusServer
from test_node_support import REPO_ROOT, ROUTER_AET, Router, folder_destination, wait_until

CHROMIUM = "/usr/bin/chromium"
SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def parse_exposition(text: str) -> dict[tuple[str, str], float]:
    """Prometheus text format -> {(name, labels): value}; fails on any malformed line."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = SAMPLE.match(line)
        assert match, f"malformed exposition line: {line!r}"
        values[(match.group(1), match.group(2) or "")] = float(match.group(3))
    return values


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def chromium_dom(url: str, tmp_path: Path) -> str:
    """The page as headless Chromium renders it (no network beyond loopback)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def shown(dom: str, metric: str, **labels: str) -> int:
    attrs = "".join(rf'\s+data-{k}="{re.escape(v)}"' for k, v in labels.items())
    match = re.search(rf'data-metric="{metric}"{attrs}>(\d+)<', dom)
    assert match, f"{metric} {labels} not on the page"
    return int(match.group(1))


def test_exposition_counts_and_histograms_are_consistent():
    metrics = NodeMetrics(["research"])
    metrics.set_probe(lambda: Probe({"incoming": 3, "outgoing/research": 2}, 12345))
    for i in range(5):
        metrics.received("CT01", 1000)
        metrics.deidentified(0.02 * i, regions_masked=1)
    metrics.forwarded("research", 0.004, 0.3)
    metrics.forwarded("research", 0.006, 2.0)
    metrics.retried("research")
    metrics.quarantined("forward", "research")
    metrics.refused("spool_full")
    values = parse_exposition(metrics.render_prometheus())
    assert values[("deid_router_instances_received_total", "")] == 5
    assert values[("deid_router_received_bytes_total", "")] == 5000
    assert values[("deid_router_pixel_regions_masked_total", "")] == 5
    assert values[("deid_router_instances_forwarded_total", '{destination="research"}')] == 2
    assert values[("deid_router_instances_retried_total", '{destination="research"}')] == 1
    assert values[("deid_router_instances_quarantined_total", '{stage="forward",where="research"}')] == 1
    assert values[("deid_router_instances_refused_total", '{reason="spool_full"}')] == 1
    assert values[("deid_router_queue_depth", '{stage="incoming"}')] == 3
    assert values[("deid_router_spool_bytes", "")] == 12345
    # histogram: cumulative buckets ending at +Inf == count; sum matches
    latency = {k[1]: v for k, v in values.items() if k[0] == "deid_router_delivery_latency_seconds_bucket"}
    assert latency['{destination="research",le="+Inf"}'] == 2
    assert latency['{destination="research",le="0.5"}'] == 1
    bounds = [latency[f'{{destination="research",le="{b!r}"}}'] for b in BUCKETS]
    assert bounds == sorted(bounds)
    assert values[("deid_router_delivery_latency_seconds_sum", '{destination="research"}')] == pytest.approx(2.3)
    stage = values[("deid_router_stage_seconds_count", '{stage="deidentify"}')]
    assert stage == 5


def test_counters_are_thread_safe():
    metrics = NodeMetrics(["a"])
    threads = [threading.Thread(target=lambda: [metrics.forwarded("a", 0.001, 0.01) for _ in range(2000)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metrics.value("deid_router_instances_forwarded_total", destination="a") == 16000


def test_repeated_errors_are_counted_not_listed_again():
    metrics = NodeMetrics(["a", "b"])
    metrics.error("deidentify", "quarantined in deidentify: malformed element")
    for _ in range(60):  # two destinations down for an hour, retried every minute
        metrics.error("forward", "a unavailable: connection refused")
        metrics.error("forward", "b unavailable: connection refused")
    errors = metrics.snapshot()["errors"]
    assert [message for _time, _stage, message in errors] == [
        "quarantined in deidentify: malformed element",
        "a unavailable: connection refused (60 times)",
        "b unavailable: connection refused (60 times)",
    ]
    metrics.error("deidentify", "quarantined in deidentify: malformed element")
    assert metrics.snapshot()["errors"][-1][2] == "quarantined in deidentify: malformed element (2 times)"


def test_endpoints_and_escaping(tmp_path: Path):
    metrics = NodeMetrics(["dest<1>"])
    metrics.error("forward", '<script>alert("x")</script> & more')
    metrics.destination_state("dest<1>", "down", "connection refused")
    healthy = {"ok": True}
    server = StatusServer(metrics, "127.0.0.1", 0, health=lambda: (healthy["ok"], "ok" if healthy["ok"] else "stopping"))
    port = server.start()
    try:
        code, body = get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and "deid_router_instances_received_total 0" in body
        parse_exposition(body)
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        healthy["ok"] = False
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 503
        code, page = get(f"http://127.0.0.1:{port}/")
        assert code == 200
        assert "<script>" not in page and "&lt;script&gt;" in page
        assert "dest&lt;1&gt;" in page and 'class="down"' in page
        assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    finally:
        server.stop()


def test_status_page_in_chromium_matches_metrics_after_a_transfer(tmp_path: Path, corpus_dir: Path):
    """The issue's acceptance: after a transfer the page shows what /metrics says."""
    files = [corpus_dir / name for name in ("pydicom__CT_small.dcm", "pydicom__examples_rgb_color.dcm",
                                            "orthanc__HierAnon_SR_IM0.dcm", "pydicom__rtplan.dcm")]
    status_port = free_port()
    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("research", out)],
                sections={"status": {"enabled": True, "port": status_port}}) as router:
        accepted = send_files("127.0.0.1", router.port, files, called_ae=ROUTER_AET)
        assert all(accepted.values())
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == len(files), timeout=60, what="all delivered")
        base = f"http://127.0.0.1:{status_port}"
        def settled() -> bool:  # delivered, and the incoming files retired (group commit)
            now = parse_exposition(get(f"{base}/metrics")[1])
            return (now.get(("deid_router_instances_forwarded_total", '{destination="research"}')) == len(files)
                    and now.get(("deid_router_queue_depth", '{stage="incoming"}')) == 0)

        wait_until(settled, timeout=10, what="forwarded counted, incoming empty")
        values = parse_exposition(get(f"{base}/metrics")[1])
        dom = chromium_dom(f"{base}/", tmp_path)
        assert values[("deid_router_instances_received_total", "")] == len(files)
        assert values[("deid_router_instances_deidentified_total", "")] == len(files)
        for metric, labels, key in (
                ("deid_router_instances_received_total", {}, ""),
                ("deid_router_instances_deidentified_total", {}, ""),
                ("deid_router_instances_forwarded_total", {"destination": "research"}, '{destination="research"}'),
                ("deid_router_queue_depth", {"stage": "incoming"}, '{stage="incoming"}')):
            assert shown(dom, metric, **labels) == values[(metric, key)], metric
        assert shown(dom, "deid_router_instances_forwarded_total") == len(files)
        assert get(f"{base}/healthz")[0] == 200
        assert router.stop() == 0


def test_a_taken_status_port_is_named_as_such(tmp_path: Path) -> None:
    """The node does not start when the status port is taken, and says that it is the
    status page's port (not the DICOM port) that could not be bound."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "router.toml"
        config.write_text(f'[node]\nspool_dir = "{tmp_path / "spool"}"\nbind = "127.0.0.1"\nport = 0\n'
                          f'[status]\nenabled = true\nport = {port}\n[logging]\nformat = "json"\n')
        done = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(config)], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 1
    [event] = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()
               if line.startswith("{") and json.loads(line)["event"] == "listen_failed"]
    assert (event["service"], event["port"], event["error"]) == ("status", port, "Address already in use")
