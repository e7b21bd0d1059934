"""Shared utilities every stage may use: counting FLOPs and parameters, timing, KL, fingerprints, JSON."""
