"""LeNet-5 in PyTorch, as anneal builds it (anneal-nn's `lenet.rs`): conv 5x5 (6 maps, padding 2),
ReLU, 2x2 max pool, conv 5x5 (16 maps), ReLU, 2x2 max pool, fully connected 400-120-84-classes with
ReLU; AdamW. The reference `anneal bench lenet` times a training step against.

As a benchmark (`python3 bench/torch_lenet.py --batch 64 --threads 2`) it times whole training
steps (forward, cross-entropy, backward, AdamW) on random 28x28 images and prints one JSON line
with the median milliseconds per step.

With `--train DIR` it instead trains on Fashion-MNIST's IDX files in DIR with N balanced labels
(`--labels`) for `--steps` steps and prints the test accuracy: the PyTorch baseline of the
label-efficiency table.
"""

import argparse
import gzip
import json
import os
import statistics
import struct
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LeNet5(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.head = nn.Linear(84, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.head(x)


def read_idx(path):
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    rank = raw[3]
    dims = struct.unpack(">" + "I" * rank, raw[4 : 4 + 4 * rank])
    return torch.frombuffer(bytearray(raw[4 + 4 * rank :]), dtype=torch.uint8).reshape(dims)


def bench(args):
    torch.manual_seed(0)
    model = LeNet5()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    times = []
    for i in range(args.warmup + args.reps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"case": "lenet", "batch": args.batch, "ms": statistics.median(times)}))


def train(args):
    torch.manual_seed(args.seed)
    xs = read_idx(os.path.join(args.train, "train-images-idx3-ubyte.gz")).float() / 255.0
    ys = read_idx(os.path.join(args.train, "train-labels-idx1-ubyte.gz")).long()
    xt = read_idx(os.path.join(args.train, "t10k-images-idx3-ubyte.gz")).float() / 255.0
    yt = read_idx(os.path.join(args.train, "t10k-labels-idx1-ubyte.gz")).long()
    mean, std = xs.mean(), xs.std()
    g = torch.Generator().manual_seed(args.seed)
    per = args.labels // 10
    idx = torch.cat([torch.nonzero(ys == c)[:, 0][torch.randperm(int((ys == c).sum()), generator=g)[:per]] for c in range(10)])
    x = ((xs[idx] - mean) / std)[:, None]
    y = ys[idx]
    model = LeNet5()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.03, anneal_strategy="cos", final_div_factor=10.0 / 25.0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        b = torch.randint(0, len(idx), (args.batch,), generator=g)
        xb = x[b]
        # Random crop with padding 2 and flips, as anneal's supervised augmentation.
        xb = F.pad(xb, (2, 2, 2, 2))
        dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
        xb = xb[:, :, dy : dy + 28, dx : dx + 28]
        if torch.rand(1, generator=g).item() < 0.5:
            xb = xb.flip(3)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), y[b]).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        acc = (model(((xt - mean) / std)[:, None]).argmax(1) == yt).float().mean().item()
    print(json.dumps({"labels": args.labels, "steps": args.steps, "accuracy": acc, "seconds": time.perf_counter() - t0}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--train", default=None)
    p.add_argument("--labels", type=int, default=600)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.train:
        train(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
