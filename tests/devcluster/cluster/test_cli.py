"""`lmforge cluster` argument wiring."""

import argparse

from lmforge.devcluster.cluster import cli


def _parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_up_options():
    args = _parse("up", "--state-dir", "/tmp/x", "--nodes", "2")
    assert (args.cluster_command, args.state_dir, args.nodes) == ("up", "/tmp/x", 2)


def test_defaults_and_other_actions():
    assert _parse("down").state_dir is None
    assert _parse("status", "--json").json is True
    assert _parse("build").cluster_command == "build"


def test_status_of_a_dir_without_cluster_exits_1(tmp_path, capsys):
    assert cli.main(_parse("status", "--state-dir", str(tmp_path))) == 1
    assert "not running" in capsys.readouterr().out


def test_reset_without_a_terminal_or_yes_deletes_nothing(tmp_path, capsys):
    data = tmp_path / "etcd-data"
    data.mkdir()
    assert cli.main(_parse("reset", "--state-dir", str(tmp_path))) == 1  # pytest's stdin is no terminal
    assert data.exists() and "nothing deleted" in capsys.readouterr().err


def test_reset_with_yes_deletes_the_data(tmp_path, capsys):
    (tmp_path / "etcd-data" / "member").mkdir(parents=True)
    assert cli.main(_parse("reset", "--yes", "--state-dir", str(tmp_path))) == 0
    assert not (tmp_path / "etcd-data").exists()
    assert "deleted the cluster data" in capsys.readouterr().err


def test_reset_asks_for_yes_in_a_terminal():
    assert cli.confirm_reset("/x", ask=lambda _: "yes", interactive=True)
    assert not cli.confirm_reset("/x", ask=lambda _: "y", interactive=True)
    assert not cli.confirm_reset("/x", ask=lambda _: "yes", interactive=False)
