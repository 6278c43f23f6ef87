"""`python -m fashion_sweep.bench`: the tutorial's input path against the fast paths.

Runs each path in this process on the same data and seed, and prints per path the
seconds per training epoch (median), samples per second, the speed-up over the
tutorial path, the test accuracy, and the seconds one evaluation of the test split
takes (and as a fraction of an epoch), as a table and as JSON. Needs torch and
torchvision only (no Hydra, no MLflow), so it runs on a bare GPU machine.

`--sweep-overhead N` also runs a real sweep of N + 2 trials (a subprocess of the train
command) and reports what a trial costs beyond its training loop. `--pruning N` runs
the preset's seeded sweep of N trials twice, without a pruner and with the recommended
one (docs/sweeps.md, Pruning), and reports the epochs trained, the wall time and the
best val/accuracy of each. `--packed N` trains N trials (learning rates 1e-3 .. 1e-1)
one after another and then packed into one program (core/stacked.py), and reports
trials per minute each way (eagerly; on CUDA with CUDA-graph-captured steps too).
`--fixed-cost N` times a single run's command N times against the bare
`import torch, torchvision`, and splits its wall time into training, evaluation and the
fixed cost (start-up, MLflow, the model file). `--sweep OVERRIDE ...` (alone: no paths
are compared) runs that sweep under each of `--launchers`, `--rounds` times in
alternation, and reports where its time goes: wall time, training and evaluation, the
busy fraction of what trains at once and the harness's share, trials per minute; each
run's timeline goes into its parent run. `--asks` (alone) says what asking the study
for a trial costs with 4, 64 and 256 trials running. The measurements are in benchmarks/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fashion_sweep.benchmarks import commands, paths
from fashion_sweep.core.data import load_splits, prepare_raw


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data-root", default="data")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--epochs", type=_at_least(1), default=3, help="timed epochs per path")
    add("--batch-size", type=_at_least(1), default=64)
    add("--train-size", type=_at_least(1), default=None, help="first N images")
    add("--seed", type=int, default=0)
    add("--json", help="also write the results to this file")
    add("--sweep-overhead", type=_at_least(0), default=0, metavar="TRIALS")
    add("--sweep-epochs", type=_at_least(1), default=1, help="epochs per sweep trial")
    add(
        "--pruning",
        type=_at_least(0),
        default=0,
        metavar="TRIALS",
        help="also run a seeded sweep of TRIALS trials without and with the recommended pruner",
    )
    add("--pruning-epochs", type=_at_least(1), default=5)
    add("--pruning-train-size", type=_at_least(1), default=10_000)
    add("--pruner", nargs="*", default=None, help="overrides that select the pruner to compare")
    add(
        "--packed",
        type=_at_least(1),
        nargs="?",
        const=64,
        default=0,
        metavar="TRIALS",
        help="also train TRIALS trials (64 if no number) one after another and packed",
    )
    add(
        "--fixed-cost",
        type=_at_least(0),
        default=0,
        metavar="TIMES",
        help="also time a single run's command against the bare torch import, TIMES times",
    )
    add(
        "--fixed-cost-run",
        nargs="*",
        default=None,
        metavar="OVERRIDE",
        help=f"the run that --fixed-cost times (default: {' '.join(commands.TINY_RUN)})",
    )
    add("--sweep", nargs="+", default=None, metavar="OVERRIDE", help="a sweep's overrides")
    add(
        "--launchers",
        nargs="+",
        default=["basic", "packed", "joblib"],
        help='launchers to compare; one may carry overrides of its own: "packed a.b=c"',
    )
    add("--rounds", type=_at_least(1), default=2, help="alternations of the --sweep launchers")
    add("--asks", action="store_true", help="alone: ms per ask as trials pile up")
    args = parser.parse_args(argv)
    if args.asks and args.sweep is not None:
        parser.error("--asks runs alone, without --sweep")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    if args.asks:
        return what_asks_cost()
    if args.sweep is not None:
        return where_sweeps_spend(args)
    device = torch.device(args.device)
    prepare_raw(args.data_root)
    splits = load_splits(args.data_root, train_size=args.train_size)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "epochs": args.epochs,
        "train_images": len(splits["train"]),
        "paths": compare_paths(args, device, splits),
    }
    show_paths(report, args)
    if args.sweep_overhead:
        report["sweep"] = commands.sweep_overhead(
            args.data_root, args.sweep_overhead, 10_000, args.sweep_epochs
        )
        show_sweep(report["sweep"])
    if args.pruning:
        report["pruning"] = commands.pruning(
            args.data_root, args.pruning, args.pruning_train_size, args.pruning_epochs, args.pruner
        )
        show_pruning(report["pruning"], args)
    if args.packed:
        report["packed"] = paths.packed_vs_alone(
            splits, device, args.packed, args.epochs, args.batch_size, args.seed
        )
        show_packed(report["packed"], args)
    if args.fixed_cost:
        report["fixed_cost"] = commands.fixed_cost(
            args.data_root, args.fixed_cost, args.fixed_cost_run
        )
        show_fixed_cost(report["fixed_cost"])
    print("\n" + json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def where_sweeps_spend(args: argparse.Namespace) -> dict:
    from fashion_sweep.benchmarks import sweep_time

    prepare_raw(args.data_root)
    report = sweep_time.sweeps(args.data_root, args.sweep, args.launchers, args.rounds)
    print(f"sweep: {' '.join(args.sweep)}; medians of {args.rounds} alternations\n")
    print(
        f"{'launcher':<16}{'wall s':>8}{'train+eval s':>14}{'slots':>7}{'busy':>7}"
        f"{'harness':>9}{'filled':>8}{'trials/min':>12}"
    )
    for name, m in report["medians"].items():
        print(
            f"{name:<16}{m['wall_seconds']:>8.1f}{m['train_eval_seconds']:>14.1f}"
            f"{max(r['slots'] for r in report['runs'][name]):>7}{100 * m['busy_fraction']:>6.0f}%"
            f"{100 * m['harness_share']:>8.0f}%{100 * m['slots_filled']:>7.0f}%"
            f"{m['trials_per_minute']:>12.1f}"
        )
    print("\n" + json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def what_asks_cost() -> dict:
    from fashion_sweep.benchmarks.ask_time import ask_costs

    rows = ask_costs()
    print("ms per ask, by trials running (20 complete beside them, TPE, SQLite)\n")
    ways = [key for key in rows[0] if key != "running"]
    print(f"{'running':>8}" + "".join(f"{way:>22}" for way in ways))
    for row in rows:
        print(f"{row['running']:>8}" + "".join(f"{row[way]:>22.1f}" for way in ways))
    return {"asks": rows}


def compare_paths(args: argparse.Namespace, device: torch.device, splits: dict) -> list[dict]:
    """Each path, on the same data and seed; the tutorial's reads with torchvision."""
    names = ["tutorial", "resident"] + (["resident+cuda_graph"] if device.type == "cuda" else [])
    rows = []
    for name in names:
        data = splits
        if name == "tutorial":
            data = load_splits(args.data_root, train_size=args.train_size, reader="torchvision")
        rows.append(paths.run_path(name, data, device, args.epochs, args.batch_size, args.seed))
    for row in rows:
        row["speedup"] = row["samples_per_second"] / rows[0]["samples_per_second"]
    return rows


def show_paths(report: dict, args: argparse.Namespace) -> None:
    print(f"{report['device']}, torch {report['torch']}, {report['train_images']} images, ")
    print(f"median of {args.epochs} epochs, batch {args.batch_size}\n")
    print(
        f"{'path':<22}{'s/epoch':>10}{'samples/s':>12}{'speed-up':>10}{'test acc':>10}"
        f"{'eval s':>9}{'eval/epoch':>12}"
    )
    for row in report["paths"]:
        print(
            f"{row['path']:<22}{row['seconds_per_epoch']:>10.3f}"
            f"{row['samples_per_second']:>12.0f}{row['speedup']:>9.2f}x"
            f"{100 * row['test_accuracy']:>9.2f}%{row['eval_seconds']:>9.3f}"
            f"{100 * row['eval_fraction']:>11.1f}%"
        )


def show_sweep(s: dict) -> None:
    print(
        f"\nsweep of {s['trials']} trials, {s['epochs']} epoch(s) on {s['train_size']} "
        "images each: "
        f"{s['seconds_per_trial']:.2f} s/trial, {s['loop_seconds_per_trial']:.2f} s in the "
        f"loop (train + eval), overhead {s['overhead_seconds_per_trial']:.3f} s "
        f"({100 * s['overhead_fraction']:.1f}%; median {s['overhead_seconds_median']:.3f} s)"
    )


def show_pruning(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\nsweep of {args.pruning} trials, {args.pruning_epochs} epochs on "
        f"{args.pruning_train_size} images each, without and with a pruner:"
    )
    print(f"{'pruner':<10}{'epochs':>8}{'pruned':>8}{'wall s':>9}{'best val acc':>14}")
    for row in rows:
        print(
            f"{row['pruner']:<10}{row['epochs_trained']:>8}{row['pruned']:>8}"
            f"{row['wall_seconds']:>9.1f}{row['best_val_accuracy']:>14.4f}"
        )


def show_packed(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n{args.packed} trials of {args.epochs} epoch(s), SGD at learning rates "
        "1e-3 .. 1e-1, one after another and packed:"
    )
    print(
        f"{'step':<12}{'alone s':>9}{'trials/min':>12}{'packed s':>10}{'trials/min':>12}"
        f"{'ratio':>8}{'best acc alone/packed':>24}{'test loss rel diff':>20}"
    )
    for p in rows:
        best = p["best_test_accuracy"]
        print(
            f"{p['step']:<12}{p['alone_seconds']:>9.2f}{p['alone_trials_per_minute']:>12.1f}"
            f"{p['packed_seconds']:>10.2f}{p['packed_trials_per_minute']:>12.1f}"
            f"{p['ratio']:>7.2f}x{best['alone']:>15.4f} / {best['packed']:.4f}"
            f"{p['max_test_loss_rel_diff']:>20.1e}"
        )


def show_fixed_cost(f: dict) -> None:
    print(
        f"\na single run ({' '.join(f['overrides'])}), median of {f['times']}: "
        f"{f['wall_seconds']:.2f} s wall = {f['train_seconds']:.2f} s training + "
        f"{f['eval_seconds']:.2f} s evaluation + {f['fixed_seconds']:.2f} s fixed cost; "
        f"`{commands.BARE_IMPORT}` {f['import_seconds']:.2f} s, the run "
        f"{f['over_import_seconds']:+.2f} s beside it (at most {f['over_import_max']:+.2f} s)"
    )


if __name__ == "__main__":
    main()
