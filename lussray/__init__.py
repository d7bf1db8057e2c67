"""lussray: large-scale unsupervised semantic segmentation (PASS / ImageNet-S) on Ray."""

__version__ = "0.1.0"
