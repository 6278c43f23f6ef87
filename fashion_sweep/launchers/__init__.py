"""Launchers of our own: packed.py (hydra/launcher=packed), a sweep's trials trained
together as one program (pack.py)."""
