"""fgcompile: fine-grained sparse attention for video diffusion transformers, as a
torch.compile backend (``backend="fgattn"``). See README.md."""

__version__ = "0.1.0"
