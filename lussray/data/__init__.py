"""Data plane: ImageNet-S layout and codec, generated data, shards, augmentation, Ray Data ingest."""
