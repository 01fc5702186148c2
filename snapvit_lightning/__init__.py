"""SnapViT for PyTorch Lightning: elastic, retraining-free structured pruning of timm ViTs."""

__version__ = "0.1.0"
