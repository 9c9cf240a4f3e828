"""Experiment runner: configs, training, one-shot sweeps, the demo."""
