"""Generate text with GPT-2: `python main.py --text "AI is the new electricity" --top_k=40`.

graykode/gpt-2-Pytorch's entry point, kept for scripts written for it; the command line is gpt2.cli
(also installed as `gpt2-generate`).
"""

import sys

from gpt2.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, prog="main.py")


if __name__ == "__main__":
    sys.exit(main())
