"""erase: remove concepts from Stable Diffusion checkpoints by fine-tuning cross-attention."""

__version__ = "0.1.0"
