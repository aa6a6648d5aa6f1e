"""One TaskConfig per model, discovered by main.py (MONAI Label radiology-app shape)."""
