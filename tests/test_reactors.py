"""pynetdicom's reactors, as the node runs them: idle associations wait, busy ones still answer."""

from __future__ import annotations

import time

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from router import reactors


def test_idle_association_waits_instead_of_polling_and_still_answers(monkeypatch) -> None:
    reactors.install()
    waits = {"dul": 0, "association": 0}
    wait_dul, wait_association = reactors._Wakeups.wait_dul, reactors._Wakeups.wait_association

    def count_dul(self, dul):
        waits["dul"] += 1
        wait_dul(self, dul)

    def count_association(self):
        waits["association"] += 1
        wait_association(self)

    monkeypatch.setattr(reactors._Wakeups, "wait_dul", count_dul)
    monkeypatch.setattr(reactors._Wakeups, "wait_association", count_association)
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    echoes = []
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_ECHO, lambda event: echoes.append(1) or 0x0000)])
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SCP")
        assert assoc.is_established
        time.sleep(0.2)  # settle
        before = dict(waits)
        time.sleep(1.0)
        idle = {k: waits[k] - before[k] for k in waits}
        # Four reactor threads (two per side): pynetdicom's 1 ms polls would be ~4,000 in
        # a second; waiting for work with a 50 ms ceiling, at most ~20 each.
        assert 0 < sum(idle.values()) <= 4 * (1.0 / reactors.CEILING + 5), idle
        for _ in range(20):  # every message still gets through at once, both ways
            status = assoc.send_c_echo()
            assert status and status.Status == 0x0000
        assert len(echoes) == 20
        assoc.release()
        assert assoc.is_released
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and (assoc.dul.is_alive() or server.active_associations):
            time.sleep(0.01)
        assert not assoc.dul.is_alive() and not server.active_associations  # both sides' reactors ended
    finally:
        server.shutdown()


def test_associations_on_descriptors_above_1024_work() -> None:
    """select() fails on descriptors of 1024 and more, and pynetdicom then took every new
    connection for closed; a busy node reaches that many (its service allows 65,536)."""
    import os
    import resource

    reactors.install()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    filler = []
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        filler.append(null)
        server = scp.start_server(("127.0.0.1", 0), block=False)
        try:
            scu = AE(ae_title="SCU")
            scu.add_requested_context(Verification)
            for _attempt in range(5):
                filler.append(os.dup(null))
                while filler[-1] < 1100:  # every free descriptor below 1100 (dup takes the lowest)
                    filler.append(os.dup(null))
                assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SCP")
                assert assoc.is_established
                if assoc.dul.socket.socket.fileno() > 1024:
                    break
                assoc.release()  # a lower descriptor was freed meanwhile (another test's leftovers)
            assert assoc.dul.socket.socket.fileno() > 1024
            for _ in range(5):
                status = assoc.send_c_echo()
                assert status and status.Status == 0x0000
            assoc.release()
            assert assoc.is_released
        finally:
            server.shutdown()
    finally:
        for fd in filler:
            os.close(fd)
