"""Pruning: calibrate -> localize -> compensate -> write, driven by one recipe."""
