"""`python -m smolthink.bench [flags]`: the bench through the main CLI parser, without the CLI's logging setup
(the GRPO and contention children start this way)."""
import sys

from ..nativeenv import native_env

native_env()  # before anything imports torch: the native libraries read it once

from ..cli import build_parser  # noqa: E402
from . import main  # noqa: E402

sys.exit(main(build_parser().parse_args(["bench", *sys.argv[1:]])))
