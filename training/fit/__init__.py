"""Fitting the head: the feature cache, triplet mining, the trainer and the training run."""
