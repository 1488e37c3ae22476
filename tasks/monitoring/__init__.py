"""Drift monitoring: the served requests against the training profile (drift, its figure)."""
