"""Evaluation: ranking metrics (HR@K, AUC), rankers to compare, plots."""
