"""What `python -m fashion_sweep.bench` measures: paths.py (training paths, torch only)
and commands.py (whole commands in subprocesses, their stores read afterwards)."""
