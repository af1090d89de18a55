"""Backends that run exported detectors, and the numpy host code around them (no torch here)."""
