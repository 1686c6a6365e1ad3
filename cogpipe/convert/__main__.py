"""python -m cogpipe.convert SRC DST [...] (same as `cogpipe convert`)."""

import argparse
import sys

from .cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m cogpipe.convert")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
