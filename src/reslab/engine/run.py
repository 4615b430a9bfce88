"""A training run's live state (`Run`), its set-up from a config (`prepare`), and its checkpoint state:
what last.pt holds, how a resume or the divergence guard's rollback restores it."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..data import TensorLoader, load_dataset, make_loaders, make_test_loader
from ..errors import ReslabError
from ..models import build_model, check_forward, check_strides, count_params, unused_parameters
from . import checkpoint, dist, gemm_conv, guard, rewrites
from .host import check_memory, set_up
from .optim import EMA, SGD, load_optimizer_state, make_optimizer, optimizer_misfit, state_bytes
from .precision import autocast, memory_format, resolve_device, resolve_precision
from .warm_start import warm_start

SHARED = 3  # the epoch sums that every rank adds to (loss x images, correct, images), all-reduced at its end


def epoch_sums(saved: list[float] = ()) -> list[float]:
    """The running sums of an epoch: loss x images, correct, images, seconds, then the steps' gradient norms
    (sum, number of finite ones, maximum, number above the clip), then the seconds the process's compute threads
    waited for a CPU (host.cpu_wait_seconds). A checkpoint from before the gradient norms were kept holds the
    first four; from before the waits, the first eight."""
    return [*saved, *[0.0] * (9 - len(saved))]


@dataclass
class Run:
    """Everything alive during one training run."""

    cfg: Config
    out: Path
    ctx: dist.DistContext
    device: torch.device
    precision: str
    model: nn.Module  # the bare model: its state_dict is what checkpoints hold
    net: nn.Module  # what the training steps call: the model, maybe wrapped in DDP, maybe compiled
    eval_net: nn.Module  # what evaluation calls without an EMA: `net` before torch.compile
    optimizer: torch.optim.Optimizer | SGD
    ema: EMA | None
    train_loader: TensorLoader
    test_loader: TensorLoader
    meta: dict  # what eval/predict need to rebuild the model and its input pipeline
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    quiet: bool = False
    guard: guard.GuardState = field(default_factory=guard.GuardState)
    history: list[dict] = field(default_factory=list)
    epoch: int = 0  # completed epochs
    batch: int = 0  # completed batches of the current epoch (mid-epoch checkpoints)
    sums: list[float] = field(default_factory=epoch_sums)  # the epoch so far: see epoch_sums
    epoch_start: dict | None = None  # the snapshot the current epoch started from: the guard's rollback point
    guard_every: int = 1  # steps between host checks (train.guard_every resolved for the device)
    pending: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (step, images, stats) unread
    interrupted: int = 0  # the signal (SIGINT, SIGTERM) that asked the run to stop; 0: none
    init: str = ""  # what model.init loaded, for the log
    val_loader: TensorLoader | None = None  # the training images data.val held out; None: none held out

    def finish_epoch(self) -> None:
        """Count the epoch in progress as done: the next one starts at its first batch, with fresh sums."""
        self.epoch, self.batch, self.sums = self.epoch + 1, 0, epoch_sums()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def speed_up(
    model: nn.Module,
    device: torch.device,
    precision: str,
    skip: tuple[str, ...] = (),
    gemm_convs: bool | None = None,
) -> None:
    """What training does to a built model, in place, before its first step (bench.make_step does the same):
    engine/rewrites.py's exact rewrites (the stem's max-pool before its ReLU, the head's pool with a cheaper
    backward), and, where they pay, small-map convolutions as matrix multiplies (engine/gemm_conv.py; torch.compile
    traces them into its graph); in bf16 on any CPU, the weight gradients oneDNN gets wrong as well. `skip` (names
    of rewrites.REWRITES) and gemm_convs (None: where training would) let a benchmark compare with and without
    each."""
    unknown = sorted(set(skip) - set(rewrites.REWRITES))
    if unknown:  # a misspelt name would otherwise skip nothing and the comparison would compare nothing
        raise ValueError(f"unknown rewrites {unknown}: choose from {sorted(rewrites.REWRITES)}")
    for name, rewrite in rewrites.REWRITES.items():
        if name not in skip:
            rewrite(model)
    small_maps = gemm_conv.pays(device, precision) if gemm_convs is None else gemm_convs
    # on every CPU in bf16: oneDNN's weight gradient of a convolution striding past its input is wrong there
    if small_maps or (device.type == "cpu" and precision == "bf16"):
        gemm_conv.use_gemm_convs(model, small_maps)


def prepare(cfg: Config, out: Path, quiet: bool = False, warm: bool = True) -> Run:
    """Build data, model and optimiser; everything that can fail on user input fails here, before any write.
    With `warm`, the model starts from `model.init`'s weights when the config names some (not on a resume)."""
    device = resolve_device(cfg.device)
    ctx = dist.setup(device.type)
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    precision = resolve_precision(cfg.precision, device)
    set_up(device)  # keep freed activations' pages for the next step; threads fitted to a CPU quota
    if device.type == "cuda":  # fixed batch shapes: cuDNN times its convolution algorithms once and keeps the
        # fastest, unless deterministic kernels were asked for (exact resume on a GPU needs them)
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic
    if cfg.train.batch_size % ctx.world_size:
        raise ReslabError(
            f"train.batch_size {cfg.train.batch_size} is not divisible by {ctx.world_size} ranks"
        )
    if (per_rank := cfg.train.batch_size // ctx.world_size) < cfg.train.accum_steps:
        raise ReslabError(
            f"train.accum_steps {cfg.train.accum_steps} exceeds the {per_rank} images of a "
            f"{'rank' if ctx.active else 'step'}'s batch: each micro-batch needs one"
        )
    graphs = cfg.train.compile and cfg.train.compile_mode in ("reduce-overhead", "max-autotune")
    if graphs and device.type == "cuda" and cfg.train.accum_steps > 1:
        # CUDA graph trees hand a micro-batch's gradients out of memory that the next one's replay overwrites:
        # the sum comes out wrong, silently (pytorch/pytorch#169545)
        raise ReslabError(
            f"train.accum_steps {cfg.train.accum_steps} cannot run under CUDA graphs (train.compile_mode "
            f"{cfg.train.compile_mode}): use compile_mode default or max-autotune-no-cudagraphs"
        )
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model.name, data.in_channels, len(data.classes), **cfg.model.options)
    size = cfg.data.resize or int(data.train_images.shape[-1])
    check_strides(model, cfg.model.name, size)
    # before the memory check: a batch of more images than there are is this mistake, whatever it would need
    if cfg.train.batch_size > len(data.train_labels):
        raise ReslabError(
            f"train.batch_size {cfg.train.batch_size} exceeds the {len(data.train_labels)} training images"
        )
    if device.type == "cpu":  # CUDA's allocator says when it runs out; Linux's OOM killer says nothing
        # the images of a micro-batch, and of the largest evaluation batch (test or validation), which is dealt
        # out to the ranks
        held = max(len(data.test_labels), 0 if data.val_labels is None else len(data.val_labels))
        batches = (
            -(-per_rank // cfg.train.accum_steps),
            -(-min(cfg.train.eval_batch_size, held) // ctx.world_size),
        )
        state = state_bytes(model, cfg.optim, cfg.train.ema > 0, ctx.world_size, cfg.train.epochs)
        shape = (data.in_channels, size, len(data.classes))
        check_memory(model, cfg.model, shape, batches, precision, state=state)
    check_forward(model, cfg.model.name, data.in_channels, len(data.classes), size)
    unused = ctx.active and unused_parameters(model, cfg.model.name, (2, data.in_channels, size, size))
    init = warm_start(model, cfg.model.init) if warm and cfg.model.init else ""
    if ctx.active and cfg.train.sync_bn:
        if device.type != "cuda":
            raise ReslabError(
                "train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm); set it false on the CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    mem = memory_format(cfg.train.channels_last)
    model = model.to(device=device, memory_format=mem)
    speed_up(model, device, precision)
    train_loader, test_loader = make_loaders(
        data,
        cfg.data,
        cfg.train.batch_size,
        cfg.train.eval_batch_size,
        cfg.seed,
        device,
        ctx.rank,
        ctx.world_size,
        cfg.train.tta_shift,
    )
    val_loader = None
    if data.val_images is not None:
        val_loader = make_test_loader(
            data.validation(),
            cfg.data,
            cfg.train.eval_batch_size,
            device,
            ctx.rank,
            ctx.world_size,
            cfg.train.tta_shift,
        )
    net = model
    if ctx.active:
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(unused),
        )
    eval_net = net  # evaluation stays eager: no second compile for eval mode, and with CUDA graphs no
    # replay overwriting the logits of a test-time flip's first call
    if cfg.train.compile:
        net = torch.compile(net, mode=cfg.train.compile_mode)
    meta = {
        "model_name": cfg.model.name,
        "model_options": dict(cfg.model.options),
        "in_channels": data.in_channels,
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "resize": cfg.data.resize,
        "image_size": int(data.train_images.shape[-1]),
        "params": count_params(model),
    }
    _seed_own_stream(cfg.seed, ctx)  # the weights above were drawn alike on every rank
    return Run(
        cfg,
        out,
        ctx,
        device,
        precision,
        model,
        net,
        eval_net,
        make_optimizer(model, cfg.optim),
        EMA(model, cfg.train.ema) if cfg.train.ema > 0 else None,
        train_loader,
        test_loader,
        meta,
        torch.amp.GradScaler(device.type) if precision == "fp16" else None,
        quiet,
        guard_every=cfg.train.guard_every or (1 if device.type == "cpu" else 50),
        init=init,
        val_loader=val_loader,
    )


def model_side(meta: dict) -> int:
    """The side in pixels of the images a run's model sees, from its meta: the resize, else the files' own."""
    return meta["resize"] or meta["image_size"]


def state_of(run: Run) -> dict:
    """What last.pt holds: everything a resume needs to continue bit for bit, and what eval/predict need."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "ema": run.ema.state_dict() if run.ema else None,
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "guard": run.guard.to_dict(),
        **rng_state(run),
        "history": run.history,
        "epoch": run.epoch,
        "batch": run.batch,
        "sums": list(run.sums),
        "config": run.cfg.to_dict(),
        "meta": run.meta,
    }


def _seed_own_stream(seed: int, ctx: dist.DistContext) -> None:
    """Under torchrun, each rank above 0 draws from its own stream from here on (dropout's masks), seeded
    seed + rank as nanoGPT seeds its ranks; rank 0 keeps the stream `seed` started."""
    if ctx.rank:
        torch.manual_seed(seed + ctx.rank)


def rng_state(run: Run) -> dict:
    """This process's random number generators: torch's CPU one and, on a GPU, CUDA's."""
    return {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
    }


def _set_rng_state(run: Run, state: dict) -> None:
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") and run.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def restore(run: Run, state: dict) -> None:
    """Continue from a checkpoint: the training state plus the guard and the run's history. Under torchrun each
    rank takes back its own generators when the checkpoint has as many ranks' ("rank_rng"); on another number
    of ranks, rank 0 goes on with the saved ones and the others start theirs again from seed + rank."""
    restore_training_state(run, state)
    if run.ctx.active:
        ranks = state.get("rank_rng") or []
        if len(ranks) == run.ctx.world_size:
            _set_rng_state(run, ranks[run.ctx.rank])
        else:
            _seed_own_stream(run.cfg.seed, run.ctx)
    if run.ctx.rank:  # rank 0 took back every rank's SHARED sums so far: the epoch's all-reduce adds them up
        run.sums[:SHARED] = [0.0] * SHARED
    run.epoch_start = start = state.get("epoch_start")  # None at an epoch's end, and in older checkpoints
    # checked now, not when a rollback restores it
    if start is not None and (why := training_misfit(run, start)):
        raise checkpoint.CheckpointError(
            f"the epoch's starting state does not fit model {run.cfg.model.name}: {why}"
        )
    starts = state.get("epoch_start_rng") or []
    # under torchrun, this rank's generators as its epoch started, when the checkpoint has as many ranks'
    if run.epoch_start is not None and run.ctx.active and len(starts) == run.ctx.world_size:
        run.epoch_start = {**run.epoch_start, **starts[run.ctx.rank]}
    run.guard = guard.GuardState(**state["guard"])
    run.history = list(state["history"])
    run.epoch = state["epoch"]


def restore_training_state(run: Run, state: dict) -> None:
    """Weights, optimiser, EMA, scaler, RNGs and the position in the epoch; not the guard, whose halved lr must
    survive a rollback."""
    if why := training_misfit(run, state):
        raise checkpoint.CheckpointError(f"checkpoint does not fit model {run.cfg.model.name}: {why}")
    run.model.load_state_dict(state["model"])
    load_optimizer_state(run.optimizer, state["optimizer"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    _set_rng_state(run, state)
    run.batch, run.sums = state["batch"], epoch_sums(state["sums"])  # a copy: the epoch adds to it in place
    run.pending = []


def training_misfit(run: Run, state: dict) -> str | None:
    """How a checkpoint's training state (checkpoint.fault checked its layout) does not fit this run's model,
    EMA and optimiser; None where it fits."""
    if why := checkpoint.misfit(run.model.state_dict(), state["model"]):
        return why
    if run.ema is not None and state.get("ema") is not None:
        if why := checkpoint.misfit(run.ema.state_dict(), state["ema"]):
            return f"its EMA: {why}"
    return optimizer_misfit(run.optimizer, state["optimizer"])


def snapshot(run: Run) -> dict:
    """An in-memory copy of the last good state, for the divergence guard."""
    return copy.deepcopy({k: v for k, v in state_of(run).items() if k not in ("history", "config", "meta")})


def prime_buckets(run: Run) -> None:
    """One forward and backward through DDP, then every state put back: nothing of the run changes.

    DDP lays its gradient buckets out again after its first step, in the order the gradients became ready. A
    run resumed under torchrun would take its first step in the first layout, which with 3 or more ranks adds
    the ranks' gradients in another order than the run never stopped (2 ranks add alike either way): its last
    bits would differ from there on. Primed, its first step all-reduces as the uninterrupted run's did."""
    snap = snapshot(run)  # BatchNorm's statistics and the generators (dropout) change below
    x, _ = next(run.train_loader.batches())
    mem = memory_format(run.cfg.train.channels_last)
    run.net.train()
    with autocast(run.device, run.precision):
        out = run.net(x.contiguous(memory_format=mem))
    out.float().sum().backward()
    run.optimizer.zero_grad(set_to_none=True)
    restore_training_state(run, snap)


def save(run: Run, name: str, state: dict | None = None) -> None:
    """Write `name` into the run directory from rank 0. Under torchrun every rank calls it at the same step: it
    gathers each rank's generators into the checkpoint ("rank_rng") for an exact resume, and the SHARED sums of
    the epoch so far added over the ranks (a checkpoint mid-epoch: rank 0 resumes with all of them). A checkpoint
    mid-epoch also holds the snapshot the epoch started from ("epoch_start", with each rank's generators then)."""
    # mid-epoch, a resume must be able to roll back to where this run would
    start = run.epoch_start if run.batch else None
    # no cuda_rng: a CPU run's none, as the checkpoint check takes it (a checkpoint edited or from elsewhere)
    start_rng = {"rng": start["rng"], "cuda_rng": start.get("cuda_rng", [])} if start else None
    ranks = dist.all_gather_object((rng_state(run), run.sums[:SHARED], start_rng), run.ctx)
    if not run.ctx.is_main:
        return
    state = state if state is not None else state_of(run)
    if start:
        state = {**state, "epoch_start": start}
    if ranks is not None:
        shared = [sum(part) for part in zip(*(sums for _, sums, _ in ranks))]
        state = {
            **state,
            "rank_rng": [rng for rng, _, _ in ranks],
            "sums": [*shared, *state["sums"][SHARED:]],
        }
        if start:
            state["epoch_start_rng"] = [rng for _, _, rng in ranks]
    try:
        checkpoint.save(state, run.out / name)
    except checkpoint.CheckpointError as e:
        if run.cfg.train.on_checkpoint_error == "stop":
            raise
        print(f"warning: {e}; training goes on (train.on_checkpoint_error=continue)", file=sys.stderr)


__all__ = [
    "Run",
    "model_side",
    "prepare",
    "prime_buckets",
    "restore",
    "restore_training_state",
    "save",
    "snapshot",
    "state_of",
]
