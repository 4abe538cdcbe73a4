"""Validation of influence scores against retraining: LDS, PBRF, IHVP accuracy."""
