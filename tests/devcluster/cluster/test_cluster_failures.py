"""A failed start names the component, shows its log tail, and leaves nothing running.
Fake component binaries (shell scripts) stand in for the Go ones: no build, no cluster."""

import argparse
import shutil
import stat

import pytest

from lmforge.devcluster.cluster import cli, cluster, processes
from lmforge.devcluster.cluster.build import BinPaths, BuildError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="cluster up needs the openssl CLI")

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl", "helm")


def _fake_bins(tmp_path, monkeypatch, etcd_script: str) -> BinPaths:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in BINARIES:
        script = bin_dir / name
        script.write_text("#!/bin/sh\n" + (etcd_script if name == "etcd" else "exit 0\n"))
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(cluster, "ensure_binaries", lambda log=None: BinPaths(bin_dir))
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    return BinPaths(bin_dir)


def test_component_that_exits_is_named_with_its_log(tmp_path, monkeypatch):
    _fake_bins(
        tmp_path, monkeypatch, "echo 'listen tcp 127.0.0.1:2379: bind: address already in use' >&2\nexit 1\n"
    )
    with pytest.raises(cluster.ClusterError) as error:
        cluster.up(tmp_path / "state", log=lambda _: None)
    assert "etcd exited while starting" in str(error.value)
    assert "address already in use" in str(error.value)
    assert not (tmp_path / "state" / "state.json").exists()


def test_component_that_never_gets_healthy_times_out_and_is_stopped(tmp_path, monkeypatch):
    _fake_bins(tmp_path, monkeypatch, "echo 'waiting for quorum'\nwhile :; do sleep 0.1; done\n")
    monkeypatch.setitem(cluster.START_TIMEOUT_S, "etcd", 1.0)
    started = []
    real_start = processes.start
    monkeypatch.setattr(
        processes, "start", lambda *a, **k: started.append(real_start(*a, **k)) or started[-1]
    )
    with pytest.raises(cluster.ClusterError, match=r"(?s)etcd not healthy .* after 1 s.*waiting for quorum"):
        cluster.up(tmp_path / "state", log=lambda _: None)
    assert started and not processes.is_alive(started[0])


def test_cli_prints_the_failure_without_a_traceback(tmp_path, monkeypatch, capsys):
    def no_go(log=None):
        raise BuildError("step 'find Go' failed: no `go` binary found.")

    monkeypatch.setattr(cluster, "ensure_binaries", no_go)
    args = argparse.Namespace(cluster_command="up", state_dir=str(tmp_path / "state"), nodes=1)
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "lmforge cluster up: step 'find Go' failed" in err
    assert "Traceback" not in err
