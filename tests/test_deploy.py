"""systemd unit, deploy/ recipes, and several nodes behind one AE address (HAProxy)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from pydicom import dcmread

from bench.synthetic import write_ct_series
from peers import DCMTK_ENV, Orthanc, free_port, storescu
from test_node_support import ROUTER_AET, Router, dicom_destination, wait_until

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "deid-router.service"
HAPROXY = "/usr/sbin/haproxy"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_verifies_and_names_real_paths(tmp_path: Path):
    settings = unit_settings()
    start = settings["ExecStart"][0].split()
    assert start[1:] == ["serve", "--config", "/etc/deid-router/router.toml"]
    assert Path(start[0]).name == "deid-router"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["deid-router"] == "router.cli:main"
    # the sandbox the issue asks for
    for key, value in {"DynamicUser": "yes", "StateDirectory": "deid-router", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
                       "CapabilityBoundingSet": "", "Restart": "on-failure", "KillSignal": "SIGTERM"}.items():
        assert settings[key] == [value], key
    assert "AF_INET" in settings["RestrictAddressFamilies"][0] and settings["MemoryMax"]
    # the example config is what the unit reads, and its spool is the unit's StateDirectory
    example = ROOT / "deploy" / "router.example.toml"
    config = tomllib.loads(example.read_text())
    assert config["node"]["spool_dir"] == "/var/lib/" + settings["StateDirectory"][0]
    assert subprocess.run([sys.executable, "-m", "router", "check-config", str(example)]).returncode == 0
    # systemd-analyze verify, with ExecStart pointed at the script installed here
    installed = shutil.which("deid-router")
    assert installed, "the deid-router console script is not installed"
    unit = tmp_path / "deid-router.service"
    unit.write_text(UNIT.read_text().replace(start[0], installed))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "deid-router.service" not in done.stderr, done.stderr  # no warnings about our unit
    for drop_in in (ROOT / "systemd" / "deid-router.service.d").glob("*.conf.example"):
        assert drop_in.read_text().splitlines()[0].startswith("# /etc/systemd/system/deid-router.service.d/")


def test_haproxy_config_is_valid():
    done = subprocess.run([HAPROXY, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_container_recipes_are_consistent():
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    assert re.search(r"^USER (?!root)", containerfile, re.M), "the image must not run as root"
    assert "VOLUME" in containerfile and "EXPOSE 11112" in containerfile
    runtime = containerfile.split("FROM ", 2)[2]  # the final stage installs nothing from PyPI
    assert "pip install" not in runtime
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    router = compose["services"]["router"]
    assert router["build"]["dockerfile"] == "deploy/Containerfile"
    assert set(compose["services"]) == {"router", "orthanc"}
    config_file = ROOT / "deploy" / router["volumes"][1].split(":")[0]
    assert subprocess.run([sys.executable, "-m", "router", "check-config", str(config_file)]).returncode == 0
    destination = tomllib.loads(config_file.read_text())["destinations"][0]
    assert destination["host"] == "orthanc"


def test_two_nodes_with_one_secret_behind_haproxy_make_one_study(tmp_path: Path):
    slices = write_ct_series(tmp_path / "ct", 20, patient_id="PID-TWO-NODES", patient_name="HALVES^ONE")
    with Orthanc(tmp_path / "pacs") as pacs:
        destination = dicom_destination("pacs", "127.0.0.1", pacs.dicom_port, pacs.aet)
        with Router(tmp_path / "a", [destination], name="node-a") as node_a, \
                Router(tmp_path / "b", [destination], name="node-b") as node_b:
            front = free_port()
            config = tmp_path / "haproxy.cfg"
            config.write_text(
                "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 5m\n    timeout server 5m\n"
                f"frontend dicom\n    bind 127.0.0.1:{front}\n    default_backend nodes\n"
                "backend nodes\n    balance roundrobin\n"
                f"    server a 127.0.0.1:{node_a.port}\n    server b 127.0.0.1:{node_b.port}\n")
            haproxy = subprocess.Popen([HAPROXY, "-f", str(config)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env=DCMTK_ENV)
            try:
                wait_until(lambda: subprocess.run(["/usr/bin/echoscu", "-aec", ROUTER_AET, "127.0.0.1", str(front)],
                                                  env=DCMTK_ENV, capture_output=True).returncode == 0,
                           timeout=20, what="haproxy up")
                for half in (slices[:10], slices[10:]):  # one association each: roundrobin alternates
                    done = storescu("127.0.0.1", front, half, called_ae=ROUTER_AET)
                    assert done.returncode == 0, done.stderr
                pacs.wait_for_instances(20, timeout=120)
            finally:
                haproxy.terminate()
                haproxy.wait(10)
            assert len(node_a.events("received")) == 10 and len(node_b.events("received")) == 10
            assert node_a.stop() == 0 and node_b.stop() == 0
        stored = [dcmread(io.BytesIO(pacs.instance_file(i))) for i in pacs.sop_instance_uids().values()]
    assert len(stored) == 20
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate",
                    "FrameOfReferenceUID"):
        assert len({str(ds.get(keyword)) for ds in stored}) == 1, keyword
    assert stored[0].PatientID != "PID-TWO-NODES"
