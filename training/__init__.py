"""Offline package: STL data layer, synthetic catalogue, embedder, training and evaluation."""
