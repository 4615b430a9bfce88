"""The seed notebook's own code, as a baseline: its Residual/ResNet-18, torch DataLoader with per-image PIL
resize to 96 and ToTensor, 4 workers, eager fp32 NCHW, SGD 0.05/0.9, batch 256. The one change: the missing
`net.train()` is put back at the start of each epoch (without it the notebook went NaN). Like d2l's
train_ch6 it moves the net and each batch to --device (the notebook used d2l.try_gpu()).

It reads the same files as reslab (no torchvision: a tiny Dataset does what FashionMNIST + Resize + ToTensor
did). Usage: python benchmarks/seed_baseline.py [--limit N] [--epochs E] [--workers 4] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils import data

from reslab.data.fashion_mnist import load_arrays


class Residual(nn.Module):  # the notebook's block, verbatim
    def __init__(self, input_channels, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


def resnet_block(input_channels, num_channels, num_residuals, first_block=False):
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk


def resnet18():
    b1 = nn.Sequential(
        nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b2 = nn.Sequential(*resnet_block(64, 64, 2, first_block=True))
    b3 = nn.Sequential(*resnet_block(64, 128, 2))
    b4 = nn.Sequential(*resnet_block(128, 256, 2))
    b5 = nn.Sequential(*resnet_block(256, 512, 2))
    return nn.Sequential(b1, b2, b3, b4, b5, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, 10))


class PILDataset(data.Dataset):
    """What torchvision's FashionMNIST(transform=Compose([Resize(96), ToTensor()])) does, per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, resize: int):
        self.images, self.labels, self.resize = images, labels, resize

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i], mode="L").resize((self.resize, self.resize), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
        return x, int(self.labels[i])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--resize", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    arrays = load_arrays()
    n = args.limit
    train = PILDataset(arrays.train_images[:n], arrays.train_labels[:n], args.resize)
    test = PILDataset(arrays.test_images[:n], arrays.test_labels[:n], args.resize)
    train_iter = data.DataLoader(train, 256, shuffle=True, num_workers=args.workers)
    test_iter = data.DataLoader(test, 256, shuffle=False, num_workers=args.workers)
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = resnet18().to(device)
    loss = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    history = []
    for epoch in range(args.epochs):
        net.train()  # the fix: the notebook never switched back after evaluating
        t0 = time.perf_counter()
        total_loss, correct, count = 0.0, 0, 0
        for X, y in train_iter:
            X, y = X.to(device), y.to(device)
            y_hat = net(X)
            l = loss(y_hat, y)
            optimizer.zero_grad()
            l.backward()
            optimizer.step()
            total_loss += l.item() * len(y)
            correct += (y_hat.argmax(1) == y).sum().item()
            count += len(y)
        train_seconds = time.perf_counter() - t0
        net.eval()
        test_loss, test_correct, test_count = 0.0, 0, 0
        with torch.no_grad():
            for X, y in test_iter:
                X, y = X.to(device), y.to(device)
                y_hat = net(X)
                test_loss += loss(y_hat, y).item() * len(y)
                test_correct += (y_hat.argmax(1) == y).sum().item()
                test_count += len(y)
        m = {
            "epoch": epoch,
            "train_loss": total_loss / count,
            "train_acc": correct / count,
            "test_loss": test_loss / test_count,
            "test_acc": test_correct / test_count,
            "images_per_sec": count / train_seconds,
        }
        history.append(m)
        print(
            f"epoch {epoch}, training loss {m['train_loss']:.4f}, training accuracy {m['train_acc']:.4f}, "
            f"testing loss {m['test_loss']:.4f}, testing accuracy {m['test_acc']:.4f}, "
            f"{m['images_per_sec']:.1f} img/s",
            flush=True,
        )
    print(json.dumps({"wall_seconds": time.perf_counter() - start, "history": history}))


if __name__ == "__main__":
    main()
