"""Scaling-law experiments: the model family, the fits (Chinchilla approaches 2 and 3), reports."""
