"""Calibration: input data, streaming statistics, and the engine that collects them."""
