"""Evaluation: a domain feature network, sample-quality metrics and their real-data baselines."""
