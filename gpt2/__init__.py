"""GPT-2 in plain PyTorch: model, checkpoint loading, byte-level BPE and sampling."""
