"""The CUDA path. Skipped where PyTorch sees no GPU (as in CI); on a GPU machine `pytest -m cuda` runs them
(benchmarks/gpu_check.sh does), with the CUDA case of test_engine's mid-epoch resume test."""

import math

import pytest
import torch
from conftest import NEEDS_CUDA, tiny_overrides

from reslab import bench, config
from reslab.data import load_dataset, make_loaders
from reslab.engine import checkpoint, fit
from reslab.errors import ReslabError
from reslab.models import build_model
from reslab.report import evaluate_checkpoint

pytestmark = NEEDS_CUDA
CUDA = torch.device("cuda")


def cuda_cfg(data_dir, **extra):
    return config.load(None, tiny_overrides(data_dir, **{"device": "cuda", **extra}))


@pytest.mark.parametrize(
    "name,size", [("resnet20", 28), ("d2l-resnet18", 96), ("wrn-16-4", 28), ("resnet50", 64)]
)
def test_models_give_the_same_outputs_on_cpu_and_cuda(name, size, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 against fp32, not TF32
    torch.manual_seed(0)
    model = build_model(name, 1, 10).eval()
    x = torch.randn(4, 1, size, size)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.to(CUDA)(x.to(CUDA)).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4, rtol=1e-3), (cpu - gpu).abs().max()


def test_loaders_on_cuda_give_the_cpu_batches(tiny_data):
    cfg = cuda_cfg(tiny_data, **{"data.crop_padding": 2, "data.flip": True, "data.erasing": 0.5})
    data = load_dataset(cfg.data)
    batches = {}
    for device in ("cpu", "cuda"):
        train, _ = make_loaders(data, cfg.data, 64, 128, 0, torch.device(device))
        train.set_epoch(1)
        batches[device] = list(train)
    for (xc, yc), (xg, yg) in zip(batches["cpu"], batches["cuda"], strict=True):
        assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
        assert torch.allclose(xc, xg.cpu(), atol=1e-6)


def test_bf16_and_fp16_training_on_cuda_learn(tiny_data, tmp_path):
    for precision in ("bf16", "fp16"):
        extra = {"precision": precision, "train.epochs": 3, "data.flip": True, "train.ema": 0.9}
        summary = fit(cuda_cfg(tiny_data, **extra), tmp_path / precision, quiet=True)
        assert summary["device"] == "cuda" and summary["precision"] == precision
        assert math.isfinite(summary["test_loss"]) and summary["test_acc"] > 0.3, summary


def test_micro_batches_train_on_cuda_compiled_but_not_under_cuda_graphs(tiny_data, tmp_path):
    """Inductor without graphs accumulates; CUDA graph trees would hand out gradients a later replay overwrites
    (the sum silently wrong, pytorch/pytorch#169545), so that combination is refused before anything is written."""
    extra = {"train.accum_steps": 2, "train.compile": True}
    summary = fit(cuda_cfg(tiny_data, **extra), tmp_path / "run", quiet=True)
    assert math.isfinite(summary["test_loss"]) and summary["test_acc"] > 0.3, summary
    with pytest.raises(ReslabError, match="train.accum_steps 2 cannot run under CUDA graphs"):
        fit(cuda_cfg(tiny_data, **extra, **{"train.compile_mode": "reduce-overhead"}), tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_checkpoint_trained_on_cuda_evaluates_the_same_on_cpu_and_cuda(tiny_data, tmp_path):
    out = tmp_path / "run"
    extra = {"train.epochs": 3, "train.tta_flip": True, "train.tta_shift": 1}
    summary = fit(cuda_cfg(tiny_data, **extra), out, quiet=True)
    state = checkpoint.load(out / "last.pt")
    assert all(t.device.type == "cpu" for t in state["model"].values())
    for device in ("cpu", "auto"):  # auto: the GPU
        result = evaluate_checkpoint(out / "last.pt", device=device)
        assert result["device"] == {"cpu": "cpu", "auto": "cuda"}[device]
        assert abs(result["test_acc"] - summary["test_acc"]) <= 2 / result["test_images"]


def test_bench_measures_on_cuda():
    fp32 = bench.gemm_peak(torch.float32, n=2048, repeats=3, device=CUDA)[0]
    bf16 = bench.gemm_peak(torch.bfloat16, n=2048, repeats=3, device=CUDA)[0]
    assert fp32 > 1000 and bf16 > fp32  # GFLOP/s: any CUDA GPU beats a CPU, and bf16 beats fp32
    ips = {p: bench.step_throughput("resnet20", 28, 256, p, repeats=3, device=CUDA) for p in ("fp32", "bf16")}
    assert ips["fp32"] > 0 and ips["bf16"] > 0
    s = bench.step_mfu("resnet20", 28, 256, "bf16", rounds=3, n=4096, device=CUDA)
    assert s["peak_gflops"] > 1000 and 0 < s["mfu"] < 1.5
    o = bench.engine_overhead(batches=8, device=CUDA)
    assert o["precision"] == "bf16" and o["engine_img_s"] > 0 and o["bare_img_s"] > 0
