"""Trainers: corrections (final labels) -> a new model version."""
