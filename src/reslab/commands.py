"""What each `reslab` subcommand does: a plain function of its parsed arguments that returns the exit code (cli.py
parses them and turns errors into one line)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ReslabError


def require_counts(*flags: tuple[str, int | None]) -> None:
    """One error line for a count option below 1 (None: not given)."""
    for flag, value in flags:
        if value is not None and value < 1:
            raise ReslabError(f"{flag} must be a positive integer, got {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from . import config
    from .engine import Interrupted, dist, fit
    from .history import n_epochs

    if args.resume:
        if not args.out:
            raise ReslabError("--resume needs --out DIR, the run directory to continue")
        saved, last = Path(args.out) / "config.yaml", Path(args.out) / "last.pt"
        if saved.is_file():
            cfg = config.load(saved, args.set)
        elif last.is_file():  # the checkpoint carries the config too
            from .engine import checkpoint

            cfg = config.from_dict(checkpoint.load(last, resume=True)["config"], args.set)
        else:
            machines = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun's --nnodes
            where = ": on several machines, --out must be a directory they all see" if machines > 1 else ""
            raise ReslabError(f"cannot resume: {args.out} holds no run (no config.yaml, no last.pt){where}")
        # the run's own config is read; another named with it would be ignored (make train names fast.yaml)
        if args.config is not None and (named := config.load(args.config).name) != cfg.name:
            raise ReslabError(
                f"--resume continues {args.out} with its own config, {cfg.name}; --config {args.config} names "
                f"another ({named}): leave --config out (make train: CONFIG=the run's recipe)"
            )
    else:
        cfg = config.load(args.config or "fast", args.set)
    if args.print_config:  # what the run's config.yaml would hold; nothing trains, nothing is written
        print(config.dump(cfg), end="")
        return 0
    out = args.out or f"runs/{cfg.name}"
    try:
        summary = fit(cfg, out, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    except Interrupted as e:  # fit's own message names fit(); here the command continues it
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
        again = f"{'the same torchrun command, with ' if torchrun else 'reslab '}train --out {out} --resume"
        raise Interrupted(e.signum, e.out, again) from None
    if summary["test_acc"] is not None and dist.is_main_process():  # under torchrun: rank 0 says it
        best = f"best {summary['best_test_acc']:.4f}"
        if summary.get("best_val_acc") is not None:  # best.pt: chosen on the held-out images
            best = f"best val {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']}"
        print(
            f"done: test acc {summary['test_acc']:.4f} ({best}) after "
            f"{n_epochs(summary['epochs'])}, {summary['wall_seconds']:.0f} s -> {out}"
        )
    return 0


def trained_for(epochs: int | None, batches: int) -> str:
    """How far a checkpoint had trained: ' (after 6 epochs)', ' (after 1 epoch and 40 batches)'; '' if unsaid."""
    if epochs is None:
        return ""
    from .history import n_epochs

    said = n_epochs(epochs)
    if batches:
        said += f" and {batches} batch{'' if batches == 1 else 'es'}"
    return f" (after {said})"


def cmd_eval(args: argparse.Namespace) -> int:
    from .report import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.path,
        out=args.out,
        data_dir=args.data_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        tta_shift=args.tta_shift,
        device=args.device,
        split=args.split,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        split = args.split
        print(
            f"{result['checkpoint']}{trained_for(result['epoch'], result['batch'])}: "
            f"{result[f'{split}_images']:,} {split} images"
        )
        loss, acc = result[f"{split}_loss"], result[f"{split}_acc"]
        print(f"{split} loss {loss:.4f}  {split} acc {acc:.4f}  top-2 {result['top2_acc']:.4f}")
        for name, acc in result["per_class_acc"].items():
            print(f"  {name:<12} {f'no {split} images' if acc is None else f'{acc:.4f}'}")
        if result.get("outputs"):
            print("wrote " + ", ".join(result["outputs"]))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .models import build_model, count_params, list_models

    for name in list_models():
        if args.names:
            print(name)
            continue
        with torch.device("meta"):  # shapes only: no memory, no initialisation (ResNet-1202 in milliseconds)
            params = count_params(build_model(name, args.in_channels, args.num_classes))
        print(f"{name:<20} {params:>12,}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from . import config
    from .data import describe
    from .models import build_model, check_config_options, input_size, summary

    if (args.model is None) == (args.config is None):
        raise ReslabError("summary: name a MODEL or a recipe with --config, one of the two")
    name, options, classes, given = args.model, {}, args.num_classes, args.input
    if args.set and args.config is None:  # a bare model takes its builder's options, nothing else
        overrides = config.parse_overrides(args.set)
        model = overrides.get("model") if list(overrides) == ["model"] else None
        if (
            not isinstance(model, dict)
            or list(model) != ["options"]
            or not isinstance(model["options"], dict)
        ):
            raise ReslabError(
                "summary MODEL: --set takes model options (model.options.KEY=VALUE); other keys need --config"
            )
        options = model["options"]
        check_config_options(name, options)
    if args.config is not None:  # the recipe's model and options, at the images and classes its data gives
        cfg = config.load(args.config, args.set)
        name, options = cfg.model.name, cfg.model.options
        fixed = 10 if cfg.data.name == "fashion-mnist" else len(cfg.data.classes or ())
        if given is None or not (fixed or classes):  # what the data's files say (Fashion-MNIST's are known)
            try:
                (channels, height, width), fixed = describe(cfg.data)
            except ReslabError as e:
                raise ReslabError(f"{e} (or give --input N,C,H,W and --num-classes N)") from None
            given = given or f"1,{channels},{height},{width}"
        if fixed and classes not in (None, fixed):  # the head would not be the one the recipe trains
            raise ReslabError(f"--num-classes {classes}: the recipe's data has {fixed} classes")
        classes = fixed or classes
    classes = 10 if classes is None else classes
    given = given or f"1,1,{input_size(name)},{input_size(name)}"
    try:
        shape = tuple(int(s) for s in given.split(","))
    except ValueError:
        raise ReslabError(f"--input {given!r}: expected comma-separated sizes like 1,1,224,224") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ReslabError(f"--input {given!r}: expected 4 positive sizes N,C,H,W like 1,1,224,224")
    model = build_model(name, shape[1], classes, **options)
    extra = "".join(f", {k}={v}" for k, v in options.items())
    print(f"{name}{extra}, input {given}")
    try:
        summary(model, shape)
    except RuntimeError as e:
        raise ReslabError(f"{name} cannot take input {shape}: {str(e).splitlines()[0]}") from None
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    require_counts(("--seeds", args.seeds), ("--draws", args.draws), ("--recalibrate", args.recalibrate))
    recalibrate = args.recalibrate or 0
    out = Path(args.out or f"runs/study-{args.study}{'-quick' if args.quick else ''}")
    # a flag of the other study would be ignored: the user would think it set what it did not
    other = {
        "degradation": ("units", ["--depth", "--units"]),
        "units": ("degradation", ["--depths", "--nets"]),
    }
    study, flags = other[args.study]
    if given := [f for f in flags if getattr(args, f[2:]) is not None]:
        raise ReslabError(
            f"{' and '.join(given)}: the {study} study's; the {args.study} study does not take "
            f"{'them' if len(given) > 1 else 'it'}"
        )
    # the flags given; the study's own defaults for the rest
    chosen = {"draws": args.draws, "recalibrate": recalibrate}
    if args.study == "degradation":
        from .studies import degradation as chosen_study

        if args.depths is not None:
            try:
                chosen["depths"] = tuple(int(d) for d in args.depths.split(","))
            except ValueError:
                raise ReslabError(f"--depths: expected depths like 20,56, got {args.depths!r}") from None
        if args.nets is not None:
            chosen["nets"] = tuple(args.nets.split(","))
    else:
        from .studies import units as chosen_study

        if args.depth is not None:
            chosen["depth"] = args.depth
        if args.units is not None:
            chosen["variants"] = tuple(args.units.split(","))
    payload = chosen_study.run(out, args.quick, args.seeds, args.set, **chosen)
    if payload is None:  # under torchrun, a rank above 0: it trained, rank 0 reports
        return 0
    print((out / "table.md").read_text())
    extra = ", responses.png" if payload.get("responses", {}).get("nets") else ""
    extra += ", gradients.png" if payload.get("gradients", {}).get("init") else ""
    extra += ", lesion.png" if payload.get("lesion", {}).get("nets") else ""
    print(
        f"wrote {out}/results.json, table.md, figure.png{extra} in {payload['seconds']:.0f} s "
        f"(the runs trained for {payload['train_seconds']:.0f} s in all)"
    )
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .runs import add_settings, describe, find_runs, group_table, read_history, seed_groups, table

    if args.plot:  # before the table is printed
        from .plots import check_format

        check_format(Path(args.plot), "--plot")
    if not args.paths:  # the default: runs/, which does not exist before the first run
        args.paths = ["runs"] if Path("runs").is_dir() else []
    runs = find_runs(args.paths)
    rows = [describe(run) for run in runs]
    if args.seeds:
        shown = seed_groups(runs, rows)
    else:
        add_settings(runs, rows)
        shown = rows
    if args.json:
        print(json.dumps(shown, indent=2))
    elif rows:
        print(group_table(shown) if args.seeds else table(shown))
    else:
        print(f"no run directories under {', '.join(args.paths) or 'runs (not made yet)'}")
    if args.plot:
        from .files import make_file_dir
        from .plots import compare

        if args.seeds:  # a line for each group of seeds: its runs' median
            groups = {g["run"]: [read_history(Path(r)) for r in g["runs"]] for g in shown if "runs" in g}
        else:
            groups = {str(run): [read_history(run)] for run, row in zip(runs, rows) if row.get("epochs")}
        # the runs with a finished epoch to draw (an unreadable run has none: its row says why)
        drawn = {name: found for name, histories in groups.items() if (found := [h for h in histories if h])}
        if not drawn:
            raise ReslabError("--plot: no run has a finished epoch to draw")
        compare(drawn, make_file_dir(Path(args.plot), "runs.png", "--plot"))
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .report import predictions

    require_counts(("--top-k", args.top_k))
    results = predictions(args.checkpoint, args.images, args.top_k, args.invert)
    if args.json:
        print(json.dumps(list(results), indent=2))
        return 0
    width = max(len(str(f)) for f in args.images)
    for r in results:  # a table row as each batch is classified: thousands of files take a while
        guesses = "  ".join(f"{t['class']}  {t['probability']:.3f}" for t in r["top"])
        print(f"{r['file']:<{width}}  {guesses}", flush=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .report import export, export_format

    path = export(args.checkpoint, args.format, args.out)
    print(f"wrote {path}")
    if export_format(path, args.format) == "torchscript":
        print("note: PyTorch deprecates TorchScript; a .pt2 file (torch.export) is the format it recommends")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    require_counts(("--seed-limit", args.seed_limit), ("--seed-rounds", args.seed_rounds))
    # the seed comparison's options, those given (the rest: bench.run's defaults)
    seed = {
        k: v for k, v in (("seed_limit", args.seed_limit), ("seed_rounds", args.seed_rounds)) if v is not None
    }
    if args.quick and seed:  # they would be ignored
        given = " and ".join(f"--{k.replace('_', '-')}" for k in seed)
        raise ReslabError(f"{given}: the seed comparison's, which --quick leaves out")
    run(Path(args.out) if args.out else None, args.quick, device=args.device, **seed)
    return 0
