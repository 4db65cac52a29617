"""edgeopt: make trained PyTorch models run well on edge hardware."""

__version__ = "0.1.0"
