"""`python -m lmforge.operator.localnode run|logs|endpoints|kill` (same as `lmforge node ...`)."""

from __future__ import annotations

import argparse
import sys

from lmforge.operator.localnode.cli import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lmforge.operator.localnode")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
