"""The tracking layer: the only code that imports MLflow (but for benchmarks/commands.py,
which reads the stores of the commands it timed).

tracker.py declares what a run asks of its tracker, by run handle. Three trackers do
it: runs.py in this process (`InProcess`), side_process.py in a process beside a single
run (`SideProcess`), writer.py in a thread beside a pack (`Writer`). sweep_runs.py
holds a sweep's parent run and finds its trials' runs; links.py makes links into
MLflow's UI; models.py logs and registers an MLflow Model; lookup.py finds a run again
(predict). stores.py checks a store's address before any work (no MLflow import),
sqlite_wal.py puts the SQLite stores in write-ahead-log mode, redaction.py masks
passwords in what leaves the process.
"""
