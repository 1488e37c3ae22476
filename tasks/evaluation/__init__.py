"""Evaluating a student: metrics with thresholds, calibration error, Grad-CAM and plots."""
