"""The model: preprocessing, backbones, the head, the one embedder, checkpoints."""
