"""Drift: the reference profile, the window test, and the offline and fleet-wide checks."""
