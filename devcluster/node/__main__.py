"""`python -m lmforge.devcluster.node run|logs|endpoints|kill` (same as `lmforge node ...`)."""

from __future__ import annotations

import argparse
import sys

from lmforge.devcluster.node.cli import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lmforge.devcluster.node")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
