"""Latency measurement: the measuring engine behind ``optimize bench`` and the build's checks."""
