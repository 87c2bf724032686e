"""`python -m smolthink.bench [flags]`: the bench through the main CLI parser, without the CLI's logging setup
(the GRPO children start this way)."""
import sys

from ..cli import build_parser
from . import main

sys.exit(main(build_parser().parse_args(["bench", *sys.argv[1:]])))
