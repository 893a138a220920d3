"""prtool: deployable Patch Ranking token pruning for CLIP image encoders."""

__version__ = "0.1.0"
