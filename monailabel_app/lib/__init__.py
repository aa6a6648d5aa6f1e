"""Citrus-V MONAI Label app: thin adapters from MONAI Label requests to the `citrusv` engine."""
