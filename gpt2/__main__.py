"""`python -m gpt2`: the same command line as `gpt2-generate` and `python main.py`."""

import sys

from gpt2.cli import main

sys.exit(main(prog="python -m gpt2"))
