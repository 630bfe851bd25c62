"""What comes in: broken instances, unknown callers, a full spool, routing, resuming a
spool, and the embedded default (no config file). Real dcmtk / pynetdicom peers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, _config, build_context

from bench.synthetic import write_ct_series
from peers import echoscu, parse_storescu_output, storescu
from router.config import DeidConfig
from router.profile import Deidentifier
from router.receive import file_meta_bytes
from test_node_support import (
    NODE_TEST_OPTIONS,
    REPO_ROOT,
    ROUTER_AET,
    SECRET,
    Router,
    dicom_destination,
    folder_destination,
    new_uid,
    original_ids,
    wait_until,
)


@pytest.fixture
def chunked_send():
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's data set, without preamble and file meta."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    return data[144 + int.from_bytes(data[140:144], "little"):]


def delivered(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.rglob("*.dcm")}


def test_broken_instances_are_quarantined_and_the_association_goes_on(tmp_path: Path, corpus_dir: Path,
                                                                       chunked_send) -> None:
    truncated = corpus_dir / "pydicom__MR_truncated.dcm"  # dcmtk refuses to even read it
    bad_vr = corpus_dir / "pydicom__badVR.dcm"
    good = corpus_dir / "pydicom__CT_small.dcm"
    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("folder", out)]) as router:
        ae = AE(ae_title="MODALITY")
        contexts = []
        for path in (truncated, bad_vr, good):
            meta = dcmread(path, stop_before_pixels=True).file_meta
            contexts.append(build_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID]))
        assoc = ae.associate("127.0.0.1", router.port, contexts=contexts, ae_title=ROUTER_AET)
        assert assoc.is_established
        assert assoc.send_c_store(truncated).Status == 0x0000
        assert assoc.send_c_store(bad_vr).Status == 0x0000
        assert assoc.send_c_store(good).Status == 0x0000  # same association, after the broken ones
        assoc.release()

        good_uid = new_uid(original_ids(good)["SOPInstanceUID"])
        wait_until(lambda: good_uid in delivered(out) and len(router.reasons("deidentify")) == 2,
                   timeout=30, what="the good instance delivered and two reasons")
        assert list(delivered(out)) == [good_uid]
        reasons = router.reasons("deidentify")
        assert all(r["stage"] == "deidentify" and r["reason"] and r["time"] for r in reasons)
        assert any("truncated" in r["reason"] for r in reasons)
        quarantined = router.files("quarantine", "deidentify")
        assert len(quarantined) == 2
        # The quarantine keeps the instances as received (data set byte for byte); the
        # reasons say nothing identifying.
        assert sorted(dataset_bytes(p) for p in quarantined) == sorted(dataset_bytes(p) for p in (truncated, bad_vr))
        text = json.dumps(reasons)
        for path in (truncated, bad_vr):
            ids = original_ids(path)
            for value in (ids["PatientName"], ids["PatientID"], ids["SOPInstanceUID"], ids["StudyInstanceUID"]):
                assert not value or value not in text
        assert router.echo_ok()  # the node is up
        assert router.stop() == 0


def test_unknown_callers_are_rejected_at_association(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "out"
    good = corpus_dir / "pydicom__CT_small.dcm"
    router = Router(tmp_path, [folder_destination("folder", out)],
                    node={"allowed_ae_titles": ["ECHOSCU", "GOODSCU"], "allowed_networks": ["127.0.0.0/8"]},
                    name="titles")
    with router:
        rejected = echoscu("127.0.0.1", router.port, called_ae=ROUTER_AET, calling_ae="BADSCU")
        assert rejected.returncode != 0
        assert "Calling AE Title Not Recognized" in rejected.stderr + rejected.stdout, rejected.stderr
        proc = storescu("127.0.0.1", router.port, [good], called_ae=ROUTER_AET, calling_ae="BADSCU")
        assert proc.returncode != 0
        [*events] = router.events("association_rejected")
        assert len(events) == 2 and {e["calling_ae"] for e in events} == {"BADSCU"}
        assert all(e["reason"] == "calling AE title not on the allow-list" and e["peer"] == "127.0.0.1"
                   for e in events)
        assert router.events("received") == []
        proc = storescu("127.0.0.1", router.port, [good], called_ae=ROUTER_AET, calling_ae="GOODSCU")
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: delivered(out), timeout=30, what="the allowed caller's instance")
        assert router.stop() == 0

    # A network allow-list that does not hold loopback: every caller is rejected.
    router = Router(tmp_path, [folder_destination("folder", out)], node={"allowed_networks": ["10.0.0.0/8"]},
                    name="networks")
    with router.start(echo_aet=None):
        assert echoscu("127.0.0.1", router.port, called_ae=ROUTER_AET, calling_ae="GOODSCU").returncode != 0
        [event] = router.events("association_rejected")
        assert event["reason"] == "client address not in an allowed network" and event["calling_ae"] == "GOODSCU"
        assert router.stop() == 0


def test_full_spool_answers_out_of_resources_and_keeps_running(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", 8, patient_id="PID-FULL-1", patient_name="FULL^FRED")
    size = files[0].stat().st_size
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))
    port = closed_port.getsockname()[1]  # bound, never listening: the destination is down
    try:
        dest = dicom_destination("down", "127.0.0.1", port, "NOBODY", retry_initial_seconds=5)
        with Router(tmp_path, [dest], node={"max_spool_bytes": int(size * 3.5)}) as router:
            proc = storescu("127.0.0.1", router.port, files, called_ae=ROUTER_AET, extra_args=("-v", "-nh"))
            answers = parse_storescu_output(proc.stderr + proc.stdout)
            accepted = [f for f in files if answers.get(str(f))]
            assert 2 <= len(accepted) <= 4 and len(answers) == len(files)
            refused = router.events("refused")
            assert len(refused) == len(files) - len(accepted)
            assert all(e["status"] == "0xA700" and "limit" in e["reason"] for e in refused)
            assert "Refused: OutOfResources" in proc.stderr + proc.stdout
            assert router.echo_ok()
            assert router.stop() == 0
        with Router(tmp_path, [dest], node={"min_free_bytes": 2**62}, name="nospace") as router:
            proc = storescu("127.0.0.1", router.port, files[:2], called_ae=ROUTER_AET, extra_args=("-v", "-nh"))
            assert not any(parse_storescu_output(proc.stderr + proc.stdout).values())
            assert all("free" in e["reason"] for e in router.events("refused"))
            assert router.files("incoming") == []
            assert router.echo_ok()
            assert router.stop() == 0
    finally:
        closed_port.close()


def test_routing_by_calling_ae_and_modality(tmp_path: Path, corpus_dir: Path) -> None:
    ct = corpus_dir / "pydicom__CT_small.dcm"
    mr = corpus_dir / "pydicom__examples_overlay.dcm"
    rt = corpus_dir / "pydicom__rtplan.dcm"
    ct_out, mr_out = tmp_path / "ct", tmp_path / "mr"
    destinations = [folder_destination("ct_only", ct_out, modalities=["ct"]),
                    folder_destination("from_mr", mr_out, from_ae_titles=["MRSCANNER"])]
    with Router(tmp_path, destinations) as router:
        assert storescu("127.0.0.1", router.port, [ct], called_ae=ROUTER_AET, calling_ae="CTSCANNER").returncode == 0
        assert storescu("127.0.0.1", router.port, [mr], called_ae=ROUTER_AET, calling_ae="MRSCANNER").returncode == 0
        assert storescu("127.0.0.1", router.port, [rt], called_ae=ROUTER_AET, calling_ae="PLANNING").returncode == 0
        wait_until(lambda: delivered(ct_out) and delivered(mr_out) and router.reasons("unrouted"), timeout=30,
                   what="three routed instances")
        assert list(delivered(ct_out)) == [new_uid(original_ids(ct)["SOPInstanceUID"])]
        assert list(delivered(mr_out)) == [new_uid(original_ids(mr)["SOPInstanceUID"])]
        [reason] = router.reasons("unrouted")
        assert reason["source_ae_title"] == "PLANNING" and reason["modality"] == "RTPLAN"
        assert [p.name for p in router.files("quarantine", "unrouted")] == [
            f"{new_uid(original_ids(rt)['SOPInstanceUID'])}.dcm"]
        # The folder destination's layout: <study>/<series>/<sop>.dcm under the new UIDs.
        [path] = delivered(ct_out).values()
        ids = original_ids(ct)
        assert path.relative_to(ct_out).parts == (new_uid(ids["StudyInstanceUID"]), new_uid(ids["SeriesInstanceUID"]),
                                                  f"{new_uid(ids['SOPInstanceUID'])}.dcm")
        assert router.stop() == 0


def test_spool_left_by_a_crash_is_resumed(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "out"
    router = Router(tmp_path, [folder_destination("folder", out)], node={"keep_delivered": True})
    ct, mr = corpus_dir / "pydicom__CT_small.dcm", corpus_dir / "pydicom__examples_overlay.dcm"
    # incoming/: a received instance (Part 10, calling AE in the file meta), never processed.
    (router.spool / "incoming").mkdir(parents=True)
    data = ct.read_bytes()
    ds = dcmread(ct, stop_before_pixels=True)
    (router.spool / "incoming" / f"{uuid.uuid4().hex}.dcm").write_bytes(
        file_meta_bytes(ds.file_meta.MediaStorageSOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID,
                        "CTSCANNER") + dataset_bytes(ct))
    # outgoing/folder/: an instance de-identified, not delivered.
    engine = Deidentifier(DeidConfig(secret=SECRET.encode(), options=frozenset(NODE_TEST_OPTIONS)), SECRET.encode())
    (router.spool / "outgoing" / "folder").mkdir(parents=True)
    result = engine.process_file(mr, router.spool / "outgoing" / "folder" / "x.dcm")
    (router.spool / "outgoing" / "folder" / "x.dcm").rename(
        router.spool / "outgoing" / "folder" / f"{result.sop_instance_uid}.dcm")
    # tmp/: a partial write, never acknowledged.
    (router.spool / "tmp").mkdir()
    (router.spool / "tmp" / "partial.dcm").write_bytes(data[:1000])
    with router:
        wait_until(lambda: len(delivered(out)) == 2, timeout=30, what="both instances delivered")
        assert set(delivered(out)) == {new_uid(original_ids(ct)["SOPInstanceUID"]), result.sop_instance_uid}
        assert list((router.spool / "tmp").iterdir()) == []
        wait_until(lambda: not router.files("incoming") and not router.files("outgoing", "folder"), timeout=10,
                   what="an empty spool")
        # keep_delivered: delivered instances stay in done/<dest>/.
        assert {p.name for p in router.files("done", "folder")} == {f"{uid}.dcm" for uid in delivered(out)}
        [opened] = router.events("spool_opened")
        assert opened["removed_partial"] == 1
        assert router.stop() == 0


def test_an_unusable_spool_directory_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    """A spool_dir that cannot be made (here under a regular file; in practice a missing
    mount or a permission) stops the node at once with exit code 1 and a logged reason."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = tmp_path / "router.toml"
    config.write_text(f'[node]\nspool_dir = "{blocker / "spool"}"\nport = 0\n[logging]\nformat = "json"\n')
    done = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    [event] = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()
               if line.startswith("{") and json.loads(line)["event"] == "spool_unusable"]
    assert event["error"] == "Not a directory" and event["path"] == str(blocker / "spool")


def test_a_second_node_on_the_same_spool_stops_at_once_and_touches_nothing(tmp_path: Path, corpus_dir: Path) -> None:
    """Two nodes on one spool would delete each other's partial and volatile files and send
    instances twice: the second one exits 1 (spool_in_use, naming the first's pid) before it
    touches the spool, the first goes on, and the lock dies with its holder."""
    good = corpus_dir / "pydicom__CT_small.dcm"
    out = tmp_path / "out"
    router = Router(tmp_path, [folder_destination("folder", out)])
    second = tmp_path / "second.toml"
    second.write_text(router.config_path.read_text().replace(f"port = {router.port}\n", "port = 0\n", 1))
    with router:
        partial = router.spool / "tmp" / "partial.dcm"  # as if a C-STORE were being received
        partial.write_bytes(b"\0" * 100)
        done = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(second)], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert done.returncode == 1
        [event] = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()
                   if line.startswith("{") and json.loads(line)["event"] == "spool_in_use"]
        assert event["pid"] == router.process.pid
        assert partial.exists()
        assert storescu("127.0.0.1", router.port, [good], called_ae=ROUTER_AET).returncode == 0
        wait_until(lambda: len(delivered(out)) == 1, timeout=30, what="the instance delivered")
        router.kill()
    router.start()  # the killed node's lock went with it
    assert router.stop() == 0


def test_sighup_stops_nothing(tmp_path: Path, corpus_dir: Path) -> None:
    """SIGHUP means "look at the spool again" (deid-router requeue, systemctl reload) to
    the node, and nothing to its workers and forwarders; a closed terminal sends it to all
    of them, which before killed the whole node."""
    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("folder", out)]) as router:
        workers = router.worker_pids()
        [forwarder] = [event["pid"] for event in router.events("forwarder_started")]
        for pid in (router.process.pid, *workers, forwarder):
            os.kill(pid, signal.SIGHUP)
        assert storescu("127.0.0.1", router.port, [corpus_dir / "pydicom__CT_small.dcm"],
                        called_ae=ROUTER_AET).returncode == 0
        wait_until(lambda: len(delivered(out)) == 1, timeout=30, what="the instance delivered")
        assert router.process.poll() is None and router.worker_pids() == workers
        assert [event["pid"] for event in router.events("forwarder_started")] == [forwarder]
        assert router.stop() == 0


def test_embedded_default_needs_no_config(tmp_path: Path, corpus_dir: Path) -> None:
    """No config file: 0.0.0.0:11112 as DEID_ROUTER, ./deid-router-spool, ./deid-router-out/."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the node's server does: TIME_WAIT is no conflict
        try:
            probe.bind(("0.0.0.0", 11112))
        except OSError:
            pytest.skip("port 11112 is in use on this machine")
    log = tmp_path / "router.log"

    def serve() -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "router", "serve"], cwd=tmp_path, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    def events(name: str) -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()
                if line.startswith("{") and json.loads(line)["event"] == name]

    good = corpus_dir / "pydicom__CT_small.dcm"
    for run in range(2):
        process = serve()
        try:
            wait_until(lambda: process.poll() is not None or
                       echoscu("127.0.0.1", 11112, called_ae="DEID_ROUTER").returncode == 0,
                       timeout=30, what="C-ECHO on 11112")
            assert process.poll() is None, log.read_text()
            [started] = events("node_started")[run:]
            assert started["ae_title"] == "DEID_ROUTER" and started["port"] == 11112
            [listening] = events("listening")[run:]
            assert listening["bind"] == "0.0.0.0"
            if run == 0:
                echo = subprocess.run([sys.executable, "-m", "router", "echo", "127.0.0.1", "11112", "--aec",
                                       "DEID_ROUTER"], capture_output=True, text=True, timeout=60,
                                      env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
                assert echo.returncode == 0 and "success" in echo.stdout, echo.stdout + echo.stderr
                assert storescu("127.0.0.1", 11112, [good], called_ae="DEID_ROUTER").returncode == 0
                uid = new_uid_for(tmp_path, original_ids(good)["SOPInstanceUID"])
                wait_until(lambda: list((tmp_path / "deid-router-out").rglob(f"{uid}.dcm")), timeout=30,
                           what="the instance in ./deid-router-out")
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
        secret_file = tmp_path / "deid-router-spool" / "site-secret"
        assert secret_file.is_file() and oct(secret_file.stat().st_mode & 0o777) == "0o600"
        if run == 0:
            secret = secret_file.read_bytes()
    assert secret_file.read_bytes() == secret  # made once, kept
    [generated] = events("site_secret_generated")  # said once, at warning level, without the value
    assert generated["level"] == "warning" and generated["path"] == str(secret_file)
    assert secret.strip().decode() not in log.read_text()
    assert (tmp_path / "deid-router-spool" / "incoming").is_dir()


def new_uid_for(cwd: Path, original: str) -> str:
    """The new UID under the secret a default node generated in cwd."""
    from router.pseudonyms import Pseudonymizer

    secret = (cwd / "deid-router-spool" / "site-secret").read_bytes().strip()
    return Pseudonymizer(secret).uid(original)


def test_command_sets_in_pieces_and_shared_pdus_are_received(tmp_path: Path, monkeypatch) -> None:
    """PS3.8 lets a sender split a command set into several fragments and put a command and
    data fragments in one P-DATA: the node reads the usual shape by hand, and these too."""
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    files = write_ct_series(tmp_path / "ct", 3)
    out = tmp_path / "out"
    shapes = iter(["split command", "command with data", "usual"])
    original_encode = DIMSEMessage.encode_msg

    def reshaped(self, context_id, max_pdu_length):
        pdatas = [p.presentation_data_value_list[0] for p in original_encode(self, context_id, 16384)]
        shape = next(shapes) if pdatas[0][1][0] == 0x03 and len(pdatas) > 1 else "usual"
        if shape == "split command":
            command = pdatas[0][1][1:]
            pdatas[0:1] = [(context_id, b"\x01" + command[:10]), (context_id, b"\x01" + command[10:40]),
                           (context_id, b"\x03" + command[40:])]
        for at, pdv in enumerate(pdatas):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append(pdv)
            if shape == "command with data" and at == 0:
                pdata.presentation_data_value_list.append(pdatas[1])  # one P-DATA, two PDVs
            elif shape == "command with data" and at == 1:
                continue
            yield pdata

    engine = Deidentifier(DeidConfig(secret=SECRET.encode(), options=frozenset(NODE_TEST_OPTIONS)), SECRET.encode())
    expected = {engine.process_file(f, tmp_path / f"expected{n}.dcm", durable=False).sop_instance_uid:
                dataset_bytes(tmp_path / f"expected{n}.dcm") for n, f in enumerate(files)}
    with Router(tmp_path, [folder_destination("folder", out)]) as router:
        ae = AE(ae_title="MODALITY")
        meta = dcmread(files[0], stop_before_pixels=True).file_meta
        assoc = ae.associate("127.0.0.1", router.port, ae_title=ROUTER_AET,
                             contexts=[build_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])])
        assert assoc.is_established
        monkeypatch.setattr(DIMSEMessage, "encode_msg", reshaped)
        assert [assoc.send_c_store(dcmread(f)).Status for f in files] == [0, 0, 0]
        monkeypatch.undo()
        assert next(shapes, "all sent") == "all sent"
        assoc.release()
        wait_until(lambda: len(delivered(out)) == 3, timeout=30, what="three instances delivered")
        assert {uid: dataset_bytes(path) for uid, path in delivered(out).items()} == expected
        assert router.stop() == 0


def test_an_absurd_pdu_length_aborts_the_association_not_the_node(tmp_path: Path, corpus_dir: Path) -> None:
    """A peer announcing a 1 GiB P-DATA PDU (the node offered 128 KiB) is aborted at once,
    before anything is allocated or read; the node goes on taking instances."""
    import struct

    from pynetdicom.sop_class import CTImageStorage, Verification

    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("folder", out)]) as router:
        ae = AE(ae_title="GOODSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", router.port, ae_title=ROUTER_AET)
        assert assoc.is_established
        assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 1 << 30) + b"\x00" * 64)
        wait_until(lambda: not assoc.is_alive(), 10, what="the association ends")
        assert assoc.is_aborted
        endings = [e["how"] for e in router.events("association_ended")]
        assert f"aborted: PDU of {1 << 30} bytes announced" in endings, endings
        ae = AE(ae_title="GOODSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", router.port, ae_title=ROUTER_AET)
        assert assoc.is_established
        status = assoc.send_c_store(dcmread(corpus_dir / "pydicom__CT_small.dcm"))
        assoc.release()
        assert status.Status == 0x0000
        wait_until(lambda: len(delivered(out)) == 1, 30, what="the instance delivered")
