"""`lmforge cluster` argument wiring."""

import argparse

from lmforge.operator.localcluster import cli


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
