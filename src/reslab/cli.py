"""`reslab` command line: the parser of its subcommands (each a plain function in commands.py), and how a run of
one ends: an exit code, and an error in one line.

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

from . import commands
from .errors import ReslabError, first_line


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
    p.set_defaults(func=commands.cmd_train)

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
        "--batch-size",
        type=int,
        metavar="N",
        help="images per batch (default: the run's train.eval_batch_size)",
    )
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
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser("runs", help="the run directories under a folder: model, epochs, accuracy, state")
    p.add_argument("paths", nargs="*", help="run directories or folders of them (default: runs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument(
        "--seeds",
        action="store_true",
        help="runs whose configs differ in their seed alone as one row: the settings that set it apart, the "
        "median and range of the test accuracy over the seeds",
    )
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw their training loss and test error per epoch (PNG); with --seeds each row's median, "
        "shaded from its lowest run to its highest",
    )
    p.set_defaults(func=commands.cmd_runs)

    p = sub.add_parser("models", parents=[imports], help="list the registered models with parameter counts")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--names", action="store_true", help="names only (fast)")
    p.set_defaults(func=commands.cmd_models)

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
    p.set_defaults(func=commands.cmd_summary)

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
    p.add_argument("--nets", help="degradation: plain, resnet, or plain,resnet (default: both)")
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
    p.set_defaults(func=commands.cmd_study)

    p = sub.add_parser("predict", parents=[imports], help="classify image files with a trained model")
    p.add_argument("checkpoint", help="run directory or checkpoint file")
    p.add_argument("images", nargs="+", help="PNG, JPEG, BMP or GIF files")
    p.add_argument("--top-k", type=int, default=1, help="show the k most likely classes")
    p.add_argument(
        "--invert", action="store_true", help="dark object on a light background (photos): invert first"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=commands.cmd_predict)

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
    p.set_defaults(func=commands.cmd_export)

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
    p.set_defaults(func=commands.cmd_bench)

    for command in sub.choices.values():  # what it does not know, a command reports with its own usage
        command.set_defaults(command_parser=command)
    return parser


def peer_trouble(text: str) -> str:
    """What a collective's error (gloo's) says of the other ranks, in words; '' if it says nothing of them."""
    for gone in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"):
        if gone in text:
            return f"another rank left ({gone}); that rank's message says why"
    if "Timed out waiting" in text or "wait timeout after" in text:
        from .engine.dist import timeout_seconds  # loaded by then: a collective or the join raised this

        limit = f"{timeout_seconds():g}"
        # the join's (DistStoreError), where torchrun's agent serves no store
        if "wait timeout after" in text:
            return (
                f"not every rank joined in RESLAB_DIST_TIMEOUT={limit} s: one stopped before (its own message "
                "says why), or cannot reach MASTER_ADDR:MASTER_PORT"
            )
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


def _say(line: str, on_screen: bool = True, after: int = 0) -> None:
    """An error's one line on stderr; under torchrun also in the file it reads each failed rank's reason from
    (TORCHELASTIC_ERROR_FILE), so that its summary of the failed ranks names the reason instead of a link.
    torchrun names the earliest failure its root cause, to the second, and of a tie the rank it lists first:
    a rank that stopped because another left says it failed `after` seconds later, so that its cause wins."""
    # one write: print's two (the line, then its newline) let torchrun's ranks splice their lines
    if on_screen:
        sys.stderr.write(line + "\n")
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        try:
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time()) + after}))
        except OSError:
            pass  # the line above is what counts
    # ranks waiting for this one to join stop now, quoting it; one that stopped for another's sake has nothing to add
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not after:
        from .engine.dist import tell_others

        tell_others(line)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        import_modules(getattr(args, "imports", []))
        return args.func(args)
    except ReslabError as e:
        _say(f"reslab: error: {e}", e.every_rank or int(os.environ.get("RANK", "0")) == 0, e.after)
        return e.exit_code
    except KeyboardInterrupt:
        _say("reslab: interrupted")
        return 130
    except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError (CUDA) is a RuntimeError
        text = str(e)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (why := peer_trouble(text)):
            # another rank stopped (its own error says why) or hangs, and this one's collective lost it: one line,
            # not a traceback that buries the cause
            _say(f"reslab: error: rank {os.environ.get('RANK', '?')} stopped: {why}", after=1)
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
