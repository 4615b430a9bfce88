"""`reslab` command line: argparse subcommands mapped to plain functions.

User mistakes end in one line `reslab: error: ...` on stderr and exit code 2 (3 for a diverged run,
1 for running out of memory, 130 for Ctrl-C, 143 for SIGTERM); no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import ReslabError, first_line


def require_counts(*flags: tuple[str, int | None]) -> None:
    """One error line for a count option below 1 (None: not given)."""
    for flag, value in flags:
        if value is not None and value < 1:
            raise ReslabError(f"{flag} must be a positive integer, got {value}")


def import_modules(specs: list[str]) -> None:
    """--import: run modules of the user's, which register models of their own, before the command. A path to a
    .py file, or a module name looked up from the current directory first, as `python -m` would find it. A
    module that registers no model is refused: most likely an installed one of the same name was found."""
    if not specs:
        return
    from .models import list_models, registered_by

    for spec in specs:
        before = set(list_models())
        module = _import(spec)
        # a second command in one process finds the module imported already: its models stay registered
        if set(list_models()) == before and not registered_by(module.__name__):
            raise ReslabError(
                f"--import {spec}: it registered no model ({getattr(module, '__file__', None) or spec}); "
                "register them with reslab.models.register, or name your file by its path"
            )


def _import(spec: str):
    """Import a module by name, or run a .py file as one; a failure is one line naming the place."""
    import importlib
    import importlib.util
    import traceback

    try:
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.is_file():
                raise ReslabError(f"--import {spec}: no such file")
            loaded = sys.modules.get(path.stem)
            if loaded is not None:  # the same file again (a second command in one process), or another module
                if Path(getattr(loaded, "__file__", None) or "").resolve() == path.resolve():
                    return loaded
                raise ReslabError(
                    f"--import {spec}: a module named {path.stem!r} is loaded already; rename the file"
                )
            found = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(found)
            # registered as an import would register it: its classes pickle and its dataclasses work
            sys.modules[path.stem] = module
            found.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(spec)
    except ReslabError:
        raise
    except ModuleNotFoundError as e:
        if e.name and (spec == e.name or spec.startswith(e.name + ".")):
            raise ReslabError(
                f"--import {spec}: no module {spec!r} here or installed (a file: {spec}.py)"
            ) from None
        raise ReslabError(f"--import {spec}: it imports {e.name!r}, which is not installed") from None
    except Exception as e:  # the user's code failed: say where, in one line
        if isinstance(e, SyntaxError):  # its text names the place already
            what, where = e.msg, f"{e.filename}:{e.lineno}"
        else:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            what, where = first_line(str(e)), f"{frame.filename}:{frame.lineno}"
        raise ReslabError(f"--import {spec}: {type(e).__name__}: {what} ({where})") from None


def cmd_train(args: argparse.Namespace) -> int:
    from . import config
    from .engine import Interrupted, dist, fit
    from .engine.fit import n_epochs

    if args.resume:
        if not args.out:
            raise ReslabError("--resume needs --out DIR, the run directory to continue")
        saved, last = Path(args.out) / "config.yaml", Path(args.out) / "last.pt"
        if saved.is_file():
            cfg = config.load(saved, args.set)
        elif last.is_file():  # the checkpoint carries the config too
            from .engine import checkpoint

            cfg = config.from_dict(checkpoint.load(last)["config"], args.set)
        else:
            raise ReslabError(f"cannot resume: {args.out} holds no run (no config.yaml, no last.pt)")
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
    said = f"{epochs} epoch{'' if epochs == 1 else 's'}"
    if batches:
        said += f" and {batches} batch{'' if batches == 1 else 'es'}"
    return f" (after {said})"


def cmd_eval(args: argparse.Namespace) -> int:
    from .report import evaluate_checkpoint

    require_counts(("--limit", args.limit))
    result = evaluate_checkpoint(
        args.path,
        out=args.out,
        data_dir=args.data_dir,
        limit=args.limit,
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
    from .models import build_model, input_size, summary

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
    from .runs import describe, find_runs, read_history, table

    if not args.paths:  # the default: runs/, which does not exist before the first run
        args.paths = ["runs"] if Path("runs").is_dir() else []
    runs = find_runs(args.paths)
    rows = [describe(run) for run in runs]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(table(rows))
    else:
        print(f"no run directories under {', '.join(args.paths) or 'runs (not made yet)'}")
    if args.plot:
        from .engine.checkpoint import make_file_dir
        from .plots import compare

        histories = {str(run): read_history(run) for run, row in zip(runs, rows) if row.get("epochs")}
        if not histories:
            raise ReslabError("--plot: no run has a finished epoch to draw")
        compare(histories, make_file_dir(Path(args.plot), "runs.png", "--plot"))
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .report import predict

    require_counts(("--top-k", args.top_k))
    results = predict(args.checkpoint, args.images, args.top_k, args.invert)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    width = max(len(r["file"]) for r in results)
    for r in results:
        guesses = "  ".join(f"{t['class']}  {t['probability']:.3f}" for t in r["top"])
        print(f"{r['file']:<{width}}  {guesses}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reslab", description="Build, train and study residual networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    imports = argparse.ArgumentParser(add_help=False)  # for the commands that build a model
    imports.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module, or a .py file, to import first: one that registers models of your own "
        "(reslab.models.register); repeatable",
    )

    p = sub.add_parser("train", parents=[imports], help="train a model from a YAML config")
    p.add_argument(
        "--config",
        help="YAML file, or a recipe of configs/ by name: fast (default), best, seed, ...; with --resume, the "
        "run's own",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides: optim.lr=0.1")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    again.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file, defaults, overrides) as YAML and exit without training",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        parents=[imports],
        help="evaluate a run directory or checkpoint on the test set (or --split), with a report",
    )
    p.add_argument("path", help="run directory (uses best.pt) or checkpoint file")
    p.add_argument("--out", help="write eval.json, confusion.png and errors.png here")
    p.add_argument("--data-dir", help="directory of the dataset files (default: the run's own)")
    p.add_argument(
        "--split",
        choices=["test", "val", "train"],
        default="test",
        help="the images to score: test (default), val (those the run's data.val held out), "
        "train (those it trained on, unaugmented)",
    )
    p.add_argument("--limit", type=int, help="evaluate on the split's first N images only")
    p.add_argument(
        "--tta-shift",
        type=int,
        metavar="N",
        help="test-time shift in pixels (default: the run's train.tta_shift)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to evaluate (default: auto, a CUDA GPU when one is visible)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("runs", help="the run directories under a folder: model, epochs, accuracy, state")
    p.add_argument("paths", nargs="*", help="run directories or folders of them (default: runs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument(
        "--plot", metavar="FILE", help="also draw their training loss and test error per epoch (PNG)"
    )
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("models", parents=[imports], help="list the registered models with parameter counts")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--names", action="store_true", help="names only (fast)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "summary", parents=[imports], help="layer table of a model: output shapes, parameters, FLOPs"
    )
    p.add_argument("model", nargs="?", help="a registered model (see `reslab models`)")
    p.add_argument(
        "--config", help="or a recipe's model with its options at its image size: a YAML file or a name"
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="with --config: dotted overrides; with a MODEL: its options, model.options.order=full-preact",
    )
    p.add_argument(
        "--input",
        help="input shape N,C,H,W (default: one gray image of the size the model is built for: 28 px, 96 for "
        "d2l-resnet18, 224 for the ImageNet-style ResNets; with --config, the size the recipe trains at)",
    )
    p.add_argument(
        "--num-classes", type=int, help="the head's classes (default 10; with --config, the recipe's data's)"
    )
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "study", help="plain vs residual at growing depth; the unit variants of He et al. 2016"
    )
    p.add_argument("study", choices=["degradation", "units"])
    p.add_argument("--quick", action="store_true", help="the CPU budget: a subset and few epochs (~30 min)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration (default 1)")
    p.add_argument("--depth", type=int, help="units: depth of the CIFAR-style ResNet (default 56)")
    p.add_argument(
        "--depths",
        help="degradation: depths of the plain and residual nets (default 20,32,44,56)",
    )
    p.add_argument("--nets", help="degradation: plain, resnet or both (default)")
    p.add_argument("--units", help="units: the unit variants, e.g. original,full-preact (default: all seven)")
    p.add_argument(
        "--draws",
        type=int,
        default=3,
        help="lesions: random sets of k units deleted, for each k (default 3); more draws narrow each k's mean",
    )
    p.add_argument(
        "--recalibrate",
        type=int,
        metavar="N",
        help="lesions: re-estimate BatchNorm statistics on N training images after each deletion "
        "(default: as trained, as Veit et al.)",
    )
    p.add_argument("--out", help="study directory (default runs/study-NAME[-quick]); rerun to resume")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("predict", parents=[imports], help="classify image files with a trained model")
    p.add_argument("checkpoint", help="run directory or checkpoint file")
    p.add_argument("images", nargs="+", help="PNG, JPEG, BMP or GIF files")
    p.add_argument("--top-k", type=int, default=1, help="show the k most likely classes")
    p.add_argument(
        "--invert", action="store_true", help="dark object on a light background (photos): invert first"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export", parents=[imports], help="export a trained model to ONNX, torch.export (.pt2) or TorchScript"
    )
    p.add_argument("checkpoint", help="run directory or checkpoint file")
    p.add_argument(
        "--format",
        choices=["onnx", "pt2", "torchscript"],
        help="default: by the suffix of --out: .onnx, .pt2, or .pt/.pth/.ts (torchscript)",
    )
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx, model.pt2 or model.pt")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "bench", help="throughput, MFU, engine overhead; the seed notebook and the seed recipe as baselines"
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="small models only, no comparison with the seed")
    p.add_argument("--seed-limit", type=int, help="images for the seed comparison (default 2560)")
    p.add_argument(
        "--seed-rounds",
        type=int,
        help="alternating rounds of the seed comparison, medians (default 3)",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to measure (default: auto)"
    )
    p.set_defaults(func=cmd_bench)

    for command in sub.choices.values():  # what it does not know, a command reports with its own usage
        command.set_defaults(command_parser=command)
    return parser


def peer_trouble(text: str) -> str:
    """What a collective's error (gloo's) says of the other ranks, in words; '' if it says nothing of them."""
    for gone in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"):
        if gone in text:
            return f"another rank left ({gone}); that rank's message says why"
    if "Timed out waiting" in text:
        from .engine.dist import timeout_seconds  # loaded by then: a collective raised this

        limit = f"{timeout_seconds():g}"
        return f"no answer from another rank in RESLAB_DIST_TIMEOUT={limit} s: it hangs, or waits elsewhere"
    return ""


# Busy-wait spins of an idle OpenMP thread before it sleeps (libgomp's default: 300,000).
OPENMP_SPINS = "30000"


def share_cpu_politely() -> None:
    """Shorten libgomp's busy wait (PyTorch's CPU threads) unless the user set GOMP_SPINCOUNT; it takes effect
    only before torch is imported, as every command imports it later. When another process takes a core, a thread
    waiting for its descheduled partner spins away the run's share of the CPU: beside two CPU-bound processes, a
    fast.yaml epoch took 7.2x as long as alone with the default and 2.9x with this; beside one, 19x and 12x. Alone,
    the same time to within noise (BENCHMARKS.md, "Sharing the CPU")."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINS)


def main(argv: list[str] | None = None) -> int:
    share_cpu_politely()
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker leaves without finalizing the interpreter. The gloo process group outlives
        # destroy_process_group: torch.distributed.nn, which DDP imports, takes `group=group.WORLD` as default
        # arguments and so holds it for good. A gloo worker thread that drops its last finished all-reduce while
        # Python finalizes aborts the process ("terminate called without an active exception", SIGABRT),
        # turning a finished run into a failed one (pytorch/pytorch#190489). Freeing the group instead (that
        # module imported before it exists) deadlocks: its destructor joins those threads holding the GIL they
        # wait for. Every file is written by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _say(line: str, on_screen: bool = True) -> None:
    """An error's one line on stderr; under torchrun also in the file it reads each failed rank's reason from
    (TORCHELASTIC_ERROR_FILE), so that its summary of the failed ranks names the reason instead of a link."""
    if on_screen:
        print(line, file=sys.stderr)
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        try:
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass  # the line above is what counts


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        import_modules(getattr(args, "imports", []))
        return args.func(args)
    except ReslabError as e:
        _say(f"reslab: error: {e}", e.every_rank or int(os.environ.get("RANK", "0")) == 0)
        return e.exit_code
    except KeyboardInterrupt:
        _say("reslab: interrupted")
        return 130
    except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError (CUDA) is a RuntimeError
        text = str(e)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (why := peer_trouble(text)):
            # another rank stopped (its own error says why) or hangs, and this one's collective lost it: one line,
            # not a traceback that buries the cause
            _say(f"reslab: error: rank {os.environ.get('RANK', '?')} stopped: {why}")
            return 1
        if (
            not isinstance(e, MemoryError)
            and "can't allocate memory" not in text
            and "out of memory" not in text
        ):
            raise
        _say(
            f"reslab: error: out of memory ({text.splitlines()[0] if text else 'MemoryError'}); a smaller "
            "batch size (train.batch_size, train.eval_batch_size) or input size (data.resize) needs less"
        )
        return 1
    except BrokenPipeError:  # the reader left (`reslab eval RUN | head -1`): stop quietly, as Unix tools do
        # point stdout at /dev/null, so that the flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    # what the system refused where no check of ours named it (a file name too long, ...)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _say(f"reslab: error: {where}{e.strerror or e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
