"""Where a sweep trial's time goes: `.venv/bin/python .ci/time_sweep_calls.py [--no-wal]`.

Runs a real sweep in this process (1 epoch on 10,000 images per trial) with a timer
around each call that matters (Hydra's job set-up, the loop, MLflow, Optuna) and the
garbage collector's passes, then prints the median milliseconds per call, each later
trial's time outside its loop (launch to next launch, less train_one_epoch and
evaluate), and one trial's calls in order (`--timeline N`, ms from its launch).
`--no-wal` leaves the SQLite stores in their default journal mode, for comparison.
Calls this version of the code does not have are skipped, so it also times older
commits (PYTHONPATH=<their checkout>).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

CALLS = [
    ("hydra._internal.config_loader_impl", "ConfigLoaderImpl.load_sweep_config"),
    ("fashion_sweep.compose", "ComposeOnce.load_sweep_config"),
    ("hydra._internal.core_plugins.basic_launcher", "BasicLauncher.launch"),
    ("hydra.core.utils", "_run_job"),
    ("fashion_sweep.launcher", "InlineLauncher.launch"),
    ("fashion_sweep.launcher", "_run_job"),
    ("hydra.core.hydra_config", "HydraConfig.set_config"),
    ("hydra.core.utils", "configure_log"),
    ("hydra.core.utils", "_save_config"),
    ("fashion_sweep.train", "train"),
    ("fashion_sweep.train", "train_one_epoch"),
    ("fashion_sweep.train", "evaluate"),
    ("fashion_sweep.train", "load_splits"),
    ("fashion_sweep.train", "make_loaders"),
    ("fashion_sweep.train", "instantiate"),
    ("fashion_sweep.train", "validate"),
    ("fashion_sweep.train", "predict_one"),
    ("fashion_sweep.tracking", "use_experiment"),
    ("fashion_sweep.tracking", "trial_run_id"),
    ("fashion_sweep.tracking", "log_artifact"),
    ("fashion_sweep.tracking", "artifacts_of"),
    ("mlflow", "start_run"),
    ("mlflow", "log_params"),
    ("mlflow", "log_text"),
    ("mlflow", "log_artifacts"),
    ("mlflow", "log_metrics"),
    ("mlflow", "end_run"),
    ("optuna.study.study", "Study.ask"),
    ("optuna.study.study", "Study.tell"),
    ("optuna.study.study", "Study.get_trials"),
    ("optuna.trial._trial", "Trial.set_user_attr"),
    ("fashion_sweep.sweep", "Sweep._reap"),
    ("fashion_sweep.sweep", "Sweep._ask"),
    ("fashion_sweep.sweep", "Sweep._launch"),
    ("fashion_sweep.study", "ReportToStudy.on_job_end"),
    ("fashion_sweep.study", "record"),
    ("fashion_sweep.study", "trial"),
    ("optuna.storages", "fail_stale_trials"),
    ("fashion_sweep.redaction", "RedactHydraFiles.on_job_start"),
    ("fashion_sweep.sweeper", "StudySweeper._configure_trials"),
    ("fashion_sweep.sweeper", "fail_stale_trials"),
    ("fashion_sweep.sweeper", "drop_surplus"),
    ("hydra_plugins.hydra_optuna_sweeper._impl", "OptunaSweeperImpl._configure_trials"),
]
SECONDS: dict[str, list[float]] = defaultdict(list)
SPANS: list[tuple[float, float, str]] = []  # (start, end, call), every call timed
LOOP = ("train_one_epoch", "evaluate")


def timed(name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            end = time.perf_counter()
            SECONDS[name].append(end - start)
            SPANS.append((start, end, name))

    return wrapper


def wrap(module_name: str, qualified: str) -> None:
    try:
        owner = importlib.import_module(module_name)
        *path, name = qualified.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, timed(qualified, getattr(owner, name)))
    except (ImportError, AttributeError):
        pass  # not in this version of the code


def time_gc(phase: str, info: dict) -> None:
    if phase == "start":
        time_gc.start = time.perf_counter()
    else:
        name = f"gc pass, generation {info['generation']}"
        SECONDS[name].append(time.perf_counter() - time_gc.start)
        SPANS.append((time_gc.start, time.perf_counter(), name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--no-wal", action="store_true")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--timeline", type=int, default=6, metavar="TRIAL")
    args = parser.parse_args()
    data_root = Path(args.data_root).resolve()
    if args.no_wal:
        import fashion_sweep.sqlite_wal

        fashion_sweep.sqlite_wal.enable = lambda: None
    import fashion_sweep.train as train_module

    for module_name, qualified in CALLS:
        wrap(module_name, qualified)
    import hydra._internal.core_plugins.basic_launcher as basic  # imported run_job by name
    import hydra.core.utils

    basic.run_job = hydra.core.utils.run_job
    gc.callbacks.append(time_gc)
    os.chdir(tempfile.mkdtemp(prefix="time-sweep-"))
    sys.argv = [
        "train",
        "-m",
        "sweep=optuna",
        f"data.root={data_root}",
        "data.train_size=10000",
        "trainer.epochs=1",
        f"hydra.sweeper.n_trials={args.trials}",
        "hydra.sweeper.study_name=timed",
    ]
    start = time.perf_counter()
    try:
        train_module.main()
    finally:
        print(f"\n{args.trials} trials in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        print(f"{'call':<55}{'calls':>6}{'median ms':>11}{'total s':>9}", file=sys.stderr)
        for name, seconds in sorted(SECONDS.items(), key=lambda kv: -statistics.median(kv[1])):
            print(
                f"{name:<55}{len(seconds):>6}{1000 * statistics.median(seconds):>11.1f}"
                f"{sum(seconds):>9.2f}",
                file=sys.stderr,
            )
        print_trials(args.timeline)


def print_trials(shown: int) -> None:
    """Per trial (the first and last left out, as in the bench): its time outside the
    loop; then trial `shown`'s calls in order."""
    launches = sorted(start for start, _, name in SPANS if name.endswith("Launcher.launch"))
    outside = []
    for number in range(1, len(launches) - 1):
        start, end = launches[number], launches[number + 1]
        loop = sum(e - s for s, e, name in SPANS if name in LOOP and start <= s < end)
        outside.append(1000 * (end - start - loop))
    if outside:
        print(
            f"\noutside the loop, trials 1-{len(outside)}: median "
            f"{statistics.median(outside):.0f} ms ({', '.join(f'{ms:.0f}' for ms in outside)})",
            file=sys.stderr,
        )
    if not 0 < shown < len(launches) - 1:
        return
    start, end = launches[shown], launches[shown + 1]
    print(f"\ntrial {shown}, {1000 * (end - start):.1f} ms: start end ms call", file=sys.stderr)
    for s, e, name in sorted(x for x in SPANS if start <= x[0] < end):
        if not name.startswith("gc pass, generation 0"):
            print(
                f"{1000 * (s - start):8.1f}{1000 * (e - start):8.1f}{1000 * (e - s):7.1f}  {name}",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
