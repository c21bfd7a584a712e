"""Command line: `pipeline train|lr-find|config|tune|evaluate|predict|export|diagnose|visualize|report|data ...`.

Bad input ends with one line and exit code 2; too many bad samples in the training data
(data.max_bad_fraction) or a shard that changed during the run with 65; remote data that cannot be had after the
retries with 69 (see pipeline.data.io.remote); non-finite training stops with 70 (see pipeline.training.nonfinite),
a write failure with 74, a preempted run with 75, a lost rank or distributed timeout with 76, Ctrl-C with 130
(the table of codes: pipeline.exits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Sequence

from pipeline.exits import (
    EXIT_DISTRIBUTED,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_USAGE,
    STOP_CODES,
    CommandSignals,
    Preempted,
    SignalStop,
    ignore_stop_signals,
)

if TYPE_CHECKING:
    from pipeline.config.schema import Config



def _load(args: argparse.Namespace):
    """The Config of `pipeline train|config show [CONFIG.yaml] [key=value ...]` (the YAML may be left out)."""
    from pipeline.config import load_config

    config_path = args.config
    overrides = list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides.insert(0, config_path)  # `pipeline train key=value` with no YAML
        config_path = None
    return load_config(config_path, overrides)


def _check_data_root(cfg: Config) -> None:
    """A data.root without our shards: one line before torch is imported, too (the run checks it again, on every
    rank, when it reads the manifest; shard specs, data.train ..., are checked there)."""
    if not (cfg.data.train or cfg.data.val or cfg.data.test):  # (pipeline.data.dataset.resolve.uses_specs loads torch)
        from pipeline.run.preflight import check_data_root

        check_data_root(cfg)


def _train(args: argparse.Namespace) -> int:
    cfg = _load(args)  # before importing torch: a bad config fails in a fraction of a second
    _check_data_root(cfg)
    from pipeline.commands.train import run_dir_of, train

    started = time.monotonic()
    metrics = train(cfg)
    if not _is_main():
        return 0
    if args.json:
        print(json.dumps({"test": metrics}, indent=None))
    else:
        from pipeline.data.dataset.resolve import dataset_manifest
        from pipeline.run.summary import print_training_summary, run_end_lines
        from pipeline.tracking.console import console

        # (an index comes from its cache)
        print_training_summary(metrics, dataset_manifest(cfg.data, task=cfg.task).classes)
        for line in run_end_lines(run_dir_of(cfg), cfg.train.monitor, time.monotonic() - started):
            console.print(line, markup=False)
    return 0


def _lr_find(args: argparse.Namespace) -> int:
    cfg = _load(args)  # before importing torch, as `train`
    from pipeline.training.lr_finder import sweep_lrs

    sweep_lrs(args.start_lr, args.end_lr, args.steps)  # bad flags: one line before torch is imported, too
    _check_data_root(cfg)
    from pipeline.commands.lr_find import lr_find, summary_lines

    found = lr_find(cfg, args.start_lr, args.end_lr, args.steps, args.out)
    if _is_main():
        print("\n".join(summary_lines(found)))
    return 0


def _config_keys(args: argparse.Namespace) -> int:
    from pipeline.commands.config import print_keys

    return print_keys(args.prefix or "", args.json)


def _config_show(args: argparse.Namespace) -> int:
    from pipeline.commands.config import print_config

    return print_config(_load(args))


def _tune(args: argparse.Namespace) -> int:
    from pipeline.commands.tune import tune_study

    tune_study(args.config, list(args.overrides))
    return 0


def _cv(args: argparse.Namespace) -> int:
    from pipeline.commands.cv import run_cv, summary_lines
    from pipeline.config import load_config

    # `folds=K` / `fold=k` are short for cv.folds=K / cv.fold=k.
    overrides = [f"cv.{o}" if o.split("=", 1)[0] in ("folds", "fold") else o for o in args.overrides]
    summary = run_cv(load_config(args.config, overrides))
    if _is_main():
        print("\n".join(summary_lines(summary)) if summary else "fold done; the summary is written when all are")
    return 0


def _data_summary(args: argparse.Namespace) -> int:
    from pipeline.data.balance import imbalance_summary
    from pipeline.data.dataset.manifest import Manifest

    print("\n".join(imbalance_summary(Manifest.read(args.root))))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.commands.evaluate import evaluate_run

    metrics = evaluate_run(args.run_dir, args.split, args.tta, args.checkpoint)
    if not _is_main():
        return 0
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        from pipeline.run.summary import print_evaluation

        print_evaluation(metrics, args.split)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from pipeline.commands.predict import format_predictions, predict

    results = predict(args.run_dir, args.inputs, args.top_k, args.tta, args.checkpoint, args.trust_code)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.commands.export import export_run

    done = export_run(args.run_dir, args.format, args.out, args.tolerance, args.checkpoint)
    print(f"parity: max abs diff of logits {done.max_abs_diff:.3g} on {done.metadata['parity_images']} validation "
          f"images (and 1 alone); tolerance {args.tolerance:g}")
    print(f"wrote {done.path} (+ {done.sidecar.name}, {done.weights.name} with the same metadata)")
    return 0


def _average(args: argparse.Namespace) -> int:
    from pipeline.commands.average import average_run

    folder, sources = average_run(args.run_dir, args.last)
    print(f"wrote {folder}: the mean of {', '.join(s.name for s in sources)}; use it with "
          f"pipeline evaluate|predict|export {args.run_dir} --checkpoint averaged")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from pipeline.commands.diagnose import diagnose_run, format_findings

    findings = diagnose_run(args.run_dir)
    print(json.dumps([f.to_dict() for f in findings], indent=2) if args.json else format_findings(findings))
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from pipeline.commands.visualize import visualize_image

    path = visualize_image(args.run_dir, args.layer, args.image, args.out, args.channels)
    print(f"feature maps: {path}\nGrad-CAM: {path.with_name(path.stem + '_gradcam.png')}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipeline.commands.report import write_report

    path, seconds = write_report(args.run_dir, args.out)
    print(f"wrote {path} in {seconds:.1f}s")
    return 0


def _data_digits(args: argparse.Namespace) -> int:
    from pipeline.data.writer.digits import write_digits_imagefolder

    count = write_digits_imagefolder(args.out)
    print(f"wrote {count} digits images to {args.out}")
    return 0


def _data_shards(args: argparse.Namespace) -> int:
    from pipeline.commands.data.shards import print_written
    from pipeline.data.writer.shards import write_shards

    fractions = [float(x) for x in args.split.split(",")]
    manifest = write_shards(args.src, args.out, fractions=fractions, max_samples=args.max_samples,
                            max_bytes=int(args.max_bytes), seed=args.seed, skip_bad=args.skip_bad,
                            dedupe=args.dedupe, val_fraction=args.val_fraction, task=args.task)
    print_written(manifest, args.out)
    return 0


def _spec_data(args: argparse.Namespace):
    """The data config a `data verify`/`data index` command line describes (keys, classes, index folder)."""
    from pipeline.config.schema import DataConfig

    return DataConfig(label_key=args.label_key, image_key=args.image_key, classes=args.classes or [],
                      index_dir=args.index_dir)


def _data_verify(args: argparse.Namespace) -> int:
    from pipeline.commands.data.verify import print_report, verify_shards

    report = verify_shards(args.root, show_progress=not args.no_progress, data=_spec_data(args))
    print_report(report)
    return 0 if report.ok else 1


def _data_index(args: argparse.Namespace) -> int:
    from pipeline.commands.data.index import index_splits

    return index_splits(args.spec, {"val": args.val, "test": args.test}, _spec_data(args), out=args.out,
                        sha256=args.sha256, progress=not args.no_progress)


def _spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-key", default="cls", help="sample key of the label: cls, txt, json.<field> (cls)")
    parser.add_argument("--image-key", default="", help="sample key of the image (default: the first image key)")
    parser.add_argument("--classes", nargs="+", default=None, help="class names in index order, or a text file")
    parser.add_argument("--index-dir", default="", help="index cache folder (default ~/.cache/pipeline/index)")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.config.schema import TASK_TYPES

    parser = argparse.ArgumentParser(prog="pipeline", description="Train and evaluate CNN image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model: pipeline train [CONFIG.yaml] [key=value ...]")
    train.add_argument("config", nargs="?", help="YAML config (defaults: the digits demo)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 optim.lr=0.01 "
                       "(every key: pipeline config keys; the result: pipeline config show)")
    train.add_argument("--json", action="store_true", help="end with the test metrics as one line of JSON "
                       "instead of a table")
    train.set_defaults(func=_train)

    lr_find = commands.add_parser("lr-find", help="learning-rate range test: loss against an exponentially growing "
                                  "lr, a plot and the optim.lr to use: pipeline lr-find CONFIG [key=value ...]")
    lr_find.add_argument("config", nargs="?", help="YAML config (defaults: the digits demo)")
    lr_find.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    lr_find.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    lr_find.add_argument("--end-lr", type=float, default=10.0, help="last learning rate (default 10)")
    lr_find.add_argument("--steps", type=int, default=100, help="optimizer steps at most (default 100; the sweep "
                         "stops early when the smoothed loss passes 4x its minimum)")
    lr_find.add_argument("--out", help="PNG to write (default <run.output_dir>/<run.name>.lr_find.png, beside the run "
                         "folder); its .json record goes beside it")
    lr_find.set_defaults(func=_lr_find)

    config = commands.add_parser("config", help="list the config keys or show a resolved config").add_subparsers(
        dest="config_command", required=True)
    keys = config.add_parser("keys", help="every config key with its type, default and meaning (from the schema)")
    keys.add_argument("prefix", nargs="?", help="only keys under this section or prefix, e.g. train or optim.l")
    keys.add_argument("--json", action="store_true", help="print JSON instead of text")
    keys.set_defaults(func=_config_keys)
    show = config.add_parser("show", help="the resolved config as YAML (defaults <- CONFIG <- overrides; "
                             "secrets masked): pipeline config show [CONFIG.yaml] [key=value ...]")
    show.add_argument("config", nargs="?", help="YAML config (default: the schema's defaults)")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5")
    show.set_defaults(func=_config_show)

    tune = commands.add_parser("tune", help="hyperparameter search: pipeline tune TUNE.yaml [key=value ...]")
    tune.add_argument("config", help="tuning YAML: a training config plus a tune: section "
                      "(see configs/tune_digits.yaml)")
    tune.add_argument("overrides", nargs="*", help="dotted overrides: tune.n_trials=8 (study) or train.epochs=3 (base)")
    tune.set_defaults(func=_tune)
    cv = commands.add_parser("cv", help="k-fold cross-validation: pipeline cv CONFIG folds=K [key=value ...]")
    cv.add_argument("config", help="YAML config")
    cv.add_argument("overrides", nargs="*", help="folds=K, fold=k (one fold only), dotted overrides")
    cv.set_defaults(func=_cv)

    evaluate = commands.add_parser("evaluate", help="re-evaluate a finished run's best weights")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", choices=["test", "val"], default="test")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON instead of tables")
    evaluate.add_argument("--tta", choices=["none", "flip", "flip_shift"], default=None,
                          help="test-time augmentation (default: the run's eval.tta)")
    evaluate.add_argument("--checkpoint", default=None, metavar="NAME",
                          help="a checkpoint folder under RUN_DIR/checkpoints instead of best (e.g. averaged)")
    evaluate.set_defaults(func=_evaluate)

    predict = commands.add_parser("predict", help="top-k classes for images with a run's best weights or an "
                                  "exported model")
    predict.add_argument("run_dir", metavar="RUN_DIR_OR_EXPORTED_MODEL",
                         help="a run folder, or a file written by pipeline export: .safetensors or .onnx (a .pt or "
                         ".pt2 only with --trust-code; its sidecar .json beside it)")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of text")
    predict.add_argument("--tta", choices=["none", "flip", "flip_shift"], default=None,
                         help="test-time augmentation (default: the run's eval.tta, or the exported model's sidecar)")
    predict.add_argument("--checkpoint", default=None, metavar="NAME",
                         help="a checkpoint folder under RUN_DIR/checkpoints instead of best (e.g. averaged)")
    predict.add_argument("--trust-code", action="store_true",
                         help="allow a TorchScript (.pt) or torch.export (.pt2) file, which runs the code inside it "
                         "when loaded (default: only run folders, exported .safetensors and .onnx)")
    predict.set_defaults(func=_predict)

    export = commands.add_parser("export", help="the best weights as TorchScript, ONNX or a torch.export program, "
                                 "checked for parity on validation images")
    export.add_argument("run_dir")
    export.add_argument("--format", required=True, choices=["torchscript", "onnx", "exported"],
                        help="torchscript (.pt), onnx (.onnx; needs pip install -e \".[export]\"), exported (.pt2)")
    export.add_argument("--out", help="file to write, with the format's suffix (default RUN_DIR/export/FORMAT/"
                        "model.pt|.onnx|.pt2), or a folder (existing, or ending in /) to write model.* into; a sidecar "
                        ".json and a .safetensors with the same stem go beside it; never inside a run's checkpoints")
    export.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest max abs diff of logits accepted (default 1e-4); above it nothing is written")
    export.add_argument("--checkpoint", default=None, metavar="NAME",
                        help="a checkpoint folder under RUN_DIR/checkpoints instead of best (e.g. averaged)")
    export.set_defaults(func=_export)

    average = commands.add_parser("average", help="average the weights of a run's last K epoch-end checkpoints into "
                                  "checkpoints/averaged")
    average.add_argument("run_dir")
    average.add_argument("--last", type=int, default=5, help="how many epoch-end checkpoints (default 5)")
    average.set_defaults(func=_average)

    diagnose = commands.add_parser("diagnose", help="explain a run's training in plain sentences")
    diagnose.add_argument("run_dir")
    diagnose.add_argument("--json", action="store_true", help="print the findings as JSON")
    diagnose.set_defaults(func=_diagnose)

    visualize = commands.add_parser("visualize", help="feature maps and Grad-CAM of one layer for one image")
    visualize.add_argument("run_dir")
    visualize.add_argument("--layer", required=True, help="module name, e.g. features.0.0 (see model.named_modules())")
    visualize.add_argument("--image", required=True, help="an image file")
    visualize.add_argument("--out", help="PNG to write (default RUN_DIR/visualize/<layer>_<image>.png)")
    visualize.add_argument("--channels", type=int, default=16, help="feature maps shown (default 16)")
    visualize.set_defaults(func=_visualize)

    report = commands.add_parser("report", help="write a self-contained report.html for a run")
    report.add_argument("run_dir")
    report.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html)")
    report.set_defaults(func=_report)

    data = commands.add_parser("data", help="prepare data").add_subparsers(dest="data_command", required=True)
    digits = data.add_parser("digits", help="write scikit-learn's digits as an ImageFolder of PNGs")
    digits.add_argument("out")
    digits.set_defaults(func=_data_digits)
    shards = data.add_parser("shards", help="ImageFolder or CSV(path,label) -> WebDataset shards + manifest.json "
                             "(CSV label sets or numbers: --task)")
    shards.add_argument("src")
    shards.add_argument("out")
    shards.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    shards.add_argument("--max-samples", type=int, default=1000, help="samples per shard at most (default 1000)")
    shards.add_argument("--max-bytes", type=float, default=float(1 << 30), help="bytes per shard at most (1 GiB)")
    shards.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    shards.add_argument("--skip-bad", action="store_true",
                        help="leave out images that cannot be decoded (listed) instead of refusing to write")
    shards.add_argument("--dedupe", action="store_true",
                        help="CSV source: keep one row of a path listed more than once with one label (warned)")
    shards.add_argument("--val-fraction", type=float, default=None,
                        help="with split folders but no val/: share of train carved into val (default: --split's)")
    shards.add_argument("--task", choices=TASK_TYPES, default="classification",
                        help="what a CSV's label is: one class (default); multilabel: class names separated by ';' "
                             "(empty: none), written as json {\"labels\": [...]}; regression: numbers separated by "
                             "';', written as json {\"target\": [...]}; the split is stratified for it")
    shards.set_defaults(func=_data_shards)
    verify = data.add_parser("verify", help="check shards against manifest.json (sha256, counts) and decode "
                             "every sample; exit 1 if anything is wrong")
    verify.add_argument("root", metavar="SHARDS", nargs="+",
                        help="our shard folder (manifest.json), or shard specs: folders, files, patterns, URLs")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    _spec_options(verify)
    verify.set_defaults(func=_data_verify)
    index = data.add_parser("index", help="read shard specs once: per-shard sample counts and labels, cached for "
                            "training (exact resume needs the counts)")
    index.add_argument("spec", nargs="+", help="shard folders, files, globs, brace patterns or URLs (http, s3, pipe:)")
    index.add_argument("--val", nargs="+", default=None, metavar="SPEC", help="validation shards: indexed too, "
                       "and a warning names their samples that are training (SPEC) samples too")
    index.add_argument("--test", nargs="+", default=None, metavar="SPEC", help="test shards: as --val")
    index.add_argument("--out", default=None, help="also write the (SPEC) index to this JSON file")
    index.add_argument("--sha256", action="store_true", help="record each local shard's sha256 (reads it again)")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    _spec_options(index)
    index.set_defaults(func=_data_index)
    summary = data.add_parser("summary", help="class counts and imbalance of a shard folder's manifest")
    summary.add_argument("root")
    summary.set_defaults(func=_data_summary)
    return parser


TRAINING_COMMANDS = ("train", "cv")
"""Commands whose preemption signals (SIGTERM, SIGUSR1) mean "stop, resume later" (exit 75) in every phase."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every way it can end gives its documented exit code and ends the processes it started
    (the loader's workers) before returning. See docs/preemption.md "Faults and failures"."""
    args = build_parser().parse_args(argv)
    signals = ("SIGINT", "SIGTERM", "SIGUSR1") if args.command in TRAINING_COMMANDS else ("SIGINT",)
    with CommandSignals(signals) as handling:
        try:
            code = _run(args)
        finally:
            _end_workers()  # before a traceback too: the workers ignore SIGTERM, nothing else would end them
        handling.ended(code)  # after a stop (75, 130), a repeated signal must not change the exit code
    return code


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError

    try:
        code = args.func(args)
        _leave_process_group()
        return code
    except Preempted as exc:  # the checkpoint is written and the way to resume printed
        _leave_process_group(failed=True)
        return exc.exit_code
    except (SignalStop, KeyboardInterrupt) as exc:
        _leave_process_group(failed=True)
        name, code = (exc.signal_name, exc.exit_code) if isinstance(exc, SignalStop) else ("SIGINT", EXIT_INTERRUPTED)
        return _fail(f"stopped by {name} outside the training loop (nothing new to checkpoint); rerun the same "
                     "command to continue from the last complete checkpoint", code)
    except Exception as exc:
        # Bad input (2), and failures that carry their own code: DataQualityError (65), NonFiniteStop (70),
        # CheckpointWriteError (74), a lost rank or a collective that timed out (76).
        # Matched by attribute, so this module never imports torch before the config is read.
        code = getattr(exc, "exit_code", None)
        lost = _distributed_failure(exc) if code is None else None
        if lost is not None:
            code, exc = EXIT_DISTRIBUTED, lost
        elif isinstance(exc, (ConfigError, FileNotFoundError, ValueError, KeyError)) and code is None:
            code = EXIT_USAGE
        elif isinstance(exc, OSError) and code is None:  # disk full, permissions... outside checkpoints
            code = EXIT_IO
        if code is None or os.environ.get("PIPELINE_DEBUG"):
            raise
        _leave_process_group(failed=True)
        if code == EXIT_DISTRIBUTED and _timed_out(lost or str(exc)):
            _report_timeout()
        if getattr(exc, "same_on_every_rank", False) and not _is_main():
            return code  # every rank stops with this very message; rank 0 says it
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return _fail(message, code)


def _end_workers() -> None:
    """End the loader's worker processes, if any were started (see pipeline.data.workers)."""
    workers = sys.modules.get("pipeline.data.workers")
    if workers is not None:
        workers.shutdown_workers()


def _timed_out(line: str) -> bool:
    """Whether a 76 line says this rank waited too long (a collective, a loader worker), not that it lost a peer."""
    return "waited longer than dist.timeout_s" in line or "(data.worker_timeout_s)" in line


def _report_timeout() -> None:
    """Tell `pipeline.distributed.launch` that this rank timed out (when it started this one); see there."""
    if "pipeline.distributed" in sys.modules:
        from pipeline.distributed.launch import report_timeout

        report_timeout()


def _distributed_failure(exc: BaseException) -> str | None:
    """The one line for an error of the process group (a rank that died, a collective that timed out), else None."""
    distributed = sys.modules.get("pipeline.distributed")
    return distributed.describe_failure(exc) if distributed is not None else None


_EXIT_AT_ONCE = False
"""Set when a command failed after this process had joined a process group (see `entry`)."""


def _leave_process_group(failed: bool = False) -> None:
    """At the end of a command (after its final barrier) or a failure that every rank agreed on, leave the
    process group before exiting: a rank that exits with gloo's threads still running can abort ('terminate
    called without an active exception', SIGABRT) and hide the real exit code."""
    global _EXIT_AT_ONCE
    distributed = sys.modules.get("pipeline.distributed")  # not imported: no process group was formed
    if distributed is not None and distributed.teardown():
        _EXIT_AT_ONCE = _EXIT_AT_ONCE or failed


def _is_main() -> bool:
    """Rank 0 of the launch, the process that prints a command's result (asked once torch is loaded)."""
    from pipeline.distributed import is_main_process

    return is_main_process()


def entry() -> None:
    """The `pipeline` command: `main()`, then exit with its code.

    A rank that stopped on a failure after joining a process group (its files are written and closed, W&B
    finished, its message printed) leaves with `os._exit` once stdout and stderr are flushed: even after
    leaving the group, the interpreter's normal teardown could still abort on gloo's threads now and then
    (SIGABRT; seen once, in a CI run of the 2-rank halt test), which would replace the exit code the launcher
    reports. The heartbeat thread of `pipeline tune` is a daemon and has nothing to finish.
    """
    code = main()
    if code in STOP_CODES:
        ignore_stop_signals()
    if _EXIT_AT_ONCE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _fail(message: object, code: int) -> int:
    """The one line a failed command prints (secrets masked), and its exit code."""
    from pipeline.config.loader import one_line
    from pipeline.config.secrets import mask_text

    print(f"error: {one_line(mask_text(str(message)))}", file=sys.stderr)
    return code


if __name__ == "__main__":
    entry()
