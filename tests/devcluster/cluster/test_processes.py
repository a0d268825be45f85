"""Process start/stop by pid and the /proc/net/tcp reader."""

import shutil
import socket

from lmforge.devcluster.cluster import processes

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1
"""


def test_parse_listening_ports_keeps_only_listen_state():
    assert processes.parse_listening_ports(PROC_NET_TCP) == {8080, 22}


def test_pick_free_ports_are_distinct_and_bindable():
    ports = processes.pick_free_ports(6)
    assert len(set(ports)) == 6
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))


def test_listening_ports_sees_a_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert sock.getsockname()[1] in processes.listening_ports()


def test_start_and_stop_by_pid(tmp_path):
    sleep = shutil.which("sleep")
    process = processes.start("sleeper", [sleep, "300"], tmp_path / "logs")
    assert processes.is_alive(process)
    assert (tmp_path / "logs" / "sleeper.log").read_text().startswith("\n==> ")
    assert processes.stop(process, timeout=5)
    assert not processes.is_alive(process)


def test_a_recycled_pid_running_another_binary_is_left_alone(tmp_path):
    sleep = shutil.which("sleep")
    process = processes.start("sleeper", [sleep, "300"], tmp_path / "logs")
    impostor = processes.Process("other", process.pid, "/usr/bin/some-other-binary", (), "")
    assert not processes.is_alive(impostor)
    assert processes.stop(impostor)  # "gone" as far as we are concerned, and not signalled
    assert processes.is_alive(process)
    processes.stop(process, timeout=5)
