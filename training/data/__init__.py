"""Data for training: containers, the synthetic generator and loaders of real formats."""
