"""systemd unit, deploy/ recipes, and several nodes behind one AE address (HAProxy).

The recipes are checked with the tools that read them (systemd-analyze, haproxy -c,
docker-compose config); the two-node set-up runs for real: HAProxy with deploy/haproxy.cfg,
two routers, dcmtk, Orthanc.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import yaml
from pydicom import dcmread

from bench.synthetic import us_rgb_with_text, write_ct_series
from peers import DCMTK_ENV, Orthanc, free_port, storescu
from router.config import DeidConfig
from router.profile import Deidentifier
from test_node_support import NODE_TEST_OPTIONS, ROUTER_AET, SECRET, Router, dicom_destination, wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = ROOT / "systemd" / "deid-router.service"
DROP_INS = ROOT / "systemd" / "deid-router.service.d"
EXAMPLE_CONFIG = DEPLOY / "router.example.toml"
HAPROXY = "/usr/sbin/haproxy"
DOCKER_COMPOSE = "/usr/bin/docker-compose"
#: systemd-analyze security's scale: 0 (locked down) .. 10 (unsandboxed); "OK" is below 4.
MAX_EXPOSURE = 2.5
#: Memory per OCR worker and for the other processes (measured: a worker peaks at ~340 MB
#: on CT slices, ~450 MB on 1024x768 images; the rest ~200 MB).
WORKER_BYTES, BASE_BYTES = 400 * 2**20, 300 * 2**20


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def memory_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)", value).groups()
    return int(number) * 1024 ** " KMGT".index(unit or " ")


def run(*command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120, **kwargs)


def test_systemd_unit_and_drop_ins_verify(tmp_path: Path):
    """systemd-analyze verify on the unit with every drop-in example, and its sandbox score."""
    settings = unit_settings(UNIT.read_text())
    start = settings["ExecStart"][0].split()
    installed = shutil.which("deid-router")
    assert installed, "the deid-router console script is not installed"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(start[0], installed))  # verify needs a real binary
    drop_ins = sorted(DROP_INS.glob("*.conf.example"))
    assert {p.name for p in drop_ins} >= {"memory.conf.example", "port-104.conf.example",
                                          "credentials.conf.example"}
    (tmp_path / f"{UNIT.name}.d").mkdir()
    for drop_in in drop_ins:  # each says where it goes
        name = drop_in.name.removesuffix(".example")
        assert drop_in.read_text().splitlines()[0] == f"# /etc/systemd/system/{UNIT.name}.d/{name}"
        (tmp_path / f"{UNIT.name}.d" / name).write_text(drop_in.read_text())
    # LoadCredential= needs its files to exist only at start; verify reads the drop-ins
    # next to the unit and prints what it cannot parse (without failing): both count here.
    done = run("systemd-analyze", "verify", unit)
    assert done.returncode == 0, done.stderr
    assert "deid-router" not in done.stderr, done.stderr

    bare = tmp_path / "bare" / UNIT.name  # the shipped unit alone, as sandboxed as it gets
    bare.parent.mkdir()
    bare.write_text(unit.read_text())
    done = run("systemd-analyze", "security", "--offline=yes", "--no-pager", bare)
    exposure = re.search(r"Overall exposure level for deid-router\.service: ([\d.]+)", done.stdout)
    assert exposure, done.stdout + done.stderr
    assert float(exposure.group(1)) <= MAX_EXPOSURE, done.stdout


def test_systemd_unit_names_what_the_package_has():
    """ExecStart, the config path, the spool, the credentials and the memory knob agree with the package."""
    settings = unit_settings(UNIT.read_text())
    start = settings["ExecStart"][0].split()
    assert Path(start[0]).name == "deid-router"
    assert start[1:] == ["serve", "--config", "/etc/deid-router/router.toml"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["deid-router"] == "router.cli:main"
    # the sandbox and the lifecycle the unit promises
    for key, value in {"DynamicUser": "yes", "StateDirectory": "deid-router", "ConfigurationDirectory": "deid-router",
                       "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
                       "CapabilityBoundingSet": "", "AmbientCapabilities": "", "Restart": "on-failure",
                       "RestartPreventExitStatus": "2", "KillSignal": "SIGTERM", "KillMode": "mixed",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}.items():
        assert settings[key] == [value], key
    assert 60 <= int(settings["TimeoutStopSec"][0]) <= 120  # the node's drain (15 s) + workers + forwarders
    # the dynamic user reads /etc/deid-router/router.toml: the directory must stay traversable
    assert int(settings["ConfigurationDirectoryMode"][0], 8) & 0o005 == 0o005
    assert int(settings["UMask"][0], 8) & 0o077 == 0o077  # spool files: the service user's only

    config = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert Path(start[-1]).parent == Path("/etc") / settings["ConfigurationDirectory"][0]
    assert config["node"]["spool_dir"] == "/var/lib/" + settings["StateDirectory"][0]
    assert config["node"]["port"] >= 1024  # no capability needed (port 104: the drop-in)
    done = run(sys.executable, "-m", "router", "check-config", EXAMPLE_CONFIG)
    assert done.returncode == 0, done.stderr
    needed = config["node"]["workers"] * WORKER_BYTES + BASE_BYTES
    assert memory_bytes(settings["MemoryMax"][0]) >= needed, "MemoryMax too small for the example's workers"

    port_104 = unit_settings((DROP_INS / "port-104.conf.example").read_text())
    assert port_104["CapabilityBoundingSet"] == port_104["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    # the credential paths the example config names are the ones the drop-in loads
    credentials = unit_settings((DROP_INS / "credentials.conf.example").read_text())["LoadCredential"]
    loaded = {f"/run/credentials/{UNIT.name}/{c.split(':')[0]}" for c in credentials}
    named = set(re.findall(r'"(/run/credentials/[^"]+)"', EXAMPLE_CONFIG.read_text()))
    assert named and named <= loaded, (named, loaded)
    assert all(c.split(":")[1].startswith("/etc/deid-router/") for c in credentials)


def test_haproxy_config_is_valid():
    done = run(HAPROXY, "-c", "-f", DEPLOY / "haproxy.cfg")
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_passes_the_compose_schema():
    done = run(DOCKER_COMPOSE, "-f", DEPLOY / "compose.yaml", "config", "-q")  # no engine needed
    assert done.returncode == 0, done.stdout + done.stderr
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"router", "orthanc"}
    router = compose["services"]["router"]
    assert router["build"]["dockerfile"] == "deploy/Containerfile"
    assert (DEPLOY / router["build"]["context"] / router["build"]["dockerfile"]).is_file()
    mounts = dict(volume.split(":")[1::-1] for volume in router["volumes"])  # target -> source
    config_file = DEPLOY / mounts["/etc/deid-router/router.toml"]
    done = run(sys.executable, "-m", "router", "check-config", config_file)
    assert done.returncode == 0, done.stderr
    config = tomllib.loads(config_file.read_text())
    assert mounts[config["node"]["spool_dir"]] in compose["volumes"]  # the spool survives the container
    destination = config["destinations"][0]
    orthanc = compose["services"]["orthanc"]
    assert destination["host"] == "orthanc" and destination["ae_title"] == orthanc["environment"]["ORTHANC__DICOM_AET"]
    assert int(router["stop_grace_period"].rstrip("s")) >= 60


def test_containerfile_installs_at_build_time_and_runs_unprivileged():
    text = (DEPLOY / "Containerfile").read_text()
    instructions = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    stages = [i for i, line in enumerate(instructions) if line.startswith("FROM ")]
    assert len(stages) == 2, "a build stage and a run stage"
    runtime = instructions[stages[1]:]
    for line in runtime:
        assert not re.search(r"\b(pip|curl|wget|apt-get)\b", line), f"the run stage fetches something: {line}"
        if line.startswith("COPY ") and "--from=" not in line:
            assert (ROOT / line.split()[1]).exists(), line
    for line in instructions[:stages[1]]:
        if line.startswith("COPY "):
            assert all((ROOT / source).exists() for source in line.split()[1:-1]), line
    user = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    config = tomllib.loads(EXAMPLE_CONFIG.read_text())
    node = config["node"]
    assert f"COPY deploy/{EXAMPLE_CONFIG.name} /etc/deid-router/router.toml" in runtime
    assert f'VOLUME ["{node["spool_dir"]}"]' in runtime and f"EXPOSE {node['port']}" in runtime
    health = next(line for line in runtime if line.startswith("HEALTHCHECK "))
    assert f'"deid-router", "echo", "127.0.0.1", "{node["port"]}"' in health
    assert f'"--aec", "{node["ae_title"]}"' in health
    assert 'CMD ["serve", "--config", "/etc/deid-router/router.toml"]' in runtime


def test_pixel_stage_needs_no_network(tmp_path: Path):
    """The OCR models ship in the wheel: scan an image with no network interface at all."""
    ds, _ = us_rgb_with_text(["OFFLINE CHECK 0042"], rows=300, columns=400)
    image = tmp_path / "us.dcm"
    ds.save_as(image, enforce_file_format=True)
    done = run("unshare", "--net", sys.executable, "-m", "router", "scan", image, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"us\.dcm: [1-9]\d* text region", done.stdout), done.stdout + done.stderr


def haproxy_config_for_test(front: int, node_ports: list[int]) -> str:
    """deploy/haproxy.cfg with loopback addresses: the shipped balancing and checks, run for real."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    text, binds = re.subn(r"(?m)^    bind :11112$", f"    bind 127.0.0.1:{front}", text)
    servers = "".join(f"    server node{i} 127.0.0.1:{port} check\n" for i, port in enumerate(node_ports, 1))
    text, removed = re.subn(r"(?m)^    server node\d+ .*\n", "", text)
    assert binds == 1 and removed == len(node_ports), "deploy/haproxy.cfg changed shape: update this test"
    return text.rstrip("\n") + "\n" + servers


def single_node_result(path: Path, tmp: Path):
    """What one de-identifier with the nodes' secret makes of path."""
    engine = Deidentifier(DeidConfig(secret=SECRET.encode(), options=frozenset(NODE_TEST_OPTIONS)), SECRET.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.process_file(path, tmp / "single-node.dcm", durable=False)
    return dcmread(tmp / "single-node.dcm")


def test_two_nodes_with_one_secret_behind_haproxy_make_one_study(tmp_path: Path):
    slices = write_ct_series(tmp_path / "ct", 20, patient_id="PID-TWO-NODES", patient_name="HALVES^ONE",
                             study_date="20240315", rows=128, columns=128)
    with Orthanc(tmp_path / "pacs") as pacs:
        destination = dicom_destination("pacs", "127.0.0.1", pacs.dicom_port, pacs.aet)
        with Router(tmp_path / "a", [destination], name="node-a") as node_a, \
                Router(tmp_path / "b", [destination], name="node-b") as node_b:
            front = free_port()
            config = tmp_path / "haproxy.cfg"
            config.write_text(haproxy_config_for_test(front, [node_a.port, node_b.port]))
            haproxy_log = tmp_path / "haproxy.log"
            with open(haproxy_log, "wb") as log:
                haproxy = subprocess.Popen([HAPROXY, "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                           env=DCMTK_ENV)
            try:
                wait_until(lambda: run("/usr/bin/echoscu", "-aec", ROUTER_AET, "127.0.0.1", str(front),
                                       env=DCMTK_ENV).returncode == 0, timeout=20, what="haproxy up")
                # one association per half: between them both nodes are idle, and leastconn
                # takes turns among equally loaded servers
                for half in (slices[:10], slices[10:]):
                    done = storescu("127.0.0.1", front, half, called_ae=ROUTER_AET)
                    assert done.returncode == 0, done.stderr
                pacs.wait_for_instances(20, timeout=120)
            finally:
                haproxy.terminate()
                haproxy.wait(10)
            received = (len(node_a.events("received")), len(node_b.events("received")))
            assert received == (10, 10), f"{received}\n{haproxy_log.read_text()}"
            assert node_a.stop() == 0 and node_b.stop() == 0
            for node in (node_a, node_b):  # the health checks' bare TCP connections are no errors
                assert not [e for e in node.events() if e.get("level") in ("error", "critical")], node.log_tail()
        assert [len(pacs.get(f"/{level}")) for level in ("patients", "studies", "series")] == [1, 1, 1]
        stored = [dcmread(io.BytesIO(pacs.instance_file(i))) for i in pacs.sop_instance_uids().values()]
    assert len(stored) == 20
    expected = single_node_result(slices[0], tmp_path)
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate",
                    "FrameOfReferenceUID", "AccessionNumber"):
        assert {str(ds.get(keyword)) for ds in stored} == {str(expected.get(keyword))}, keyword
    assert expected.PatientID != "PID-TWO-NODES" and expected.StudyDate != "20240315"
