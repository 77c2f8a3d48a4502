"""GPT-2 in pure PyTorch: load a checkpoint (gpt2.checkpoint), encode text (gpt2.encoder), generate
(gpt2.sample). The command line is gpt2.cli (`gpt2-generate`, `python -m gpt2`, `python main.py`)."""

__version__ = "1.0.0"
