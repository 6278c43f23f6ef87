"""The sweeps layer: our Optuna sweeper for Hydra.

plugin.py is the Hydra plugin (configuration only, imported by every run); settings.py
its values and their checks; apps.py what a sweep asks of the app it runs (any Hydra
app, or this one); opening.py what a sweep opens before its first trial (the
search space from space.py, the sampler from sampler.py, the study from study.py, its
folder and MLflow parent run); loop.py the loop that asks, launches and records;
snapshot.py the study as a round of asks reads it (once, whatever is running);
slots.py how trials reach the launcher (slots refilled as trials end, or batches);
schedule.py the loop's decisions as pure functions; workers.py whether a worker is
alive; progress.py the console's line per trial; trial_output.py a trial's own output
in its folder's log; report.py the results, plots and parent run at the end (importances.py fANOVA's
importances for them), winner.py the best trial's model registered; pruning.py a trial's
side of pruning; callbacks.py the Hydra callbacks (a job's outcome recorded, a plain
multirun's jobs checked, passwords masked); compose.py a sweep's config composed once.
"""
