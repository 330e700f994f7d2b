"""Measurement: MACs from executed ops, speed, accuracy, data loading and reports."""
