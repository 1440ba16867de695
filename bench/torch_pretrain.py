#!/usr/bin/env python3
"""The reference for `anneal pretrain`: the same GPT, recipe and data, in PyTorch.

Reads the tokenized corpus anneal wrote (manifest.json and the u16/u32 shards), builds the same
model (GPT-2 blocks, pre-norm, tanh-GELU MLP, learned positions, tied head, optional biases) and
trains it the way anneal's trainer does: random windows of block_size + 1 tokens, AdamW without
decay on norms, biases and embeddings, linear warm-up then cosine decay (nanoGPT's get_lr),
global-norm clipping, validation every eval_interval steps on eval_batches random batches.

    python3 bench/torch_pretrain.py --config configs/shakespeare-char.toml [--set key=value ...]

Prints one JSON line: validation losses by step, wall time, ms/step, tokens/s, peak RSS.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def load_config(path, overrides):
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    for o in overrides:
        key, value = o.split("=", 1)
        section, name = key.split(".", 1)
        old = cfg[section][name]
        cfg[section][name] = type(old)(value) if not isinstance(old, bool) else value == "true"
    return cfg


def shards(data_dir, split):
    with open(os.path.join(data_dir, "manifest.json")) as f:
        m = json.load(f)
    dtype = np.uint16 if m["dtype"] == "u16" else np.uint32
    parts = [np.fromfile(os.path.join(data_dir, s["file"]), dtype=dtype) for s in m[split]]
    for s, part in zip(m[split], parts):
        if len(part) != s["tokens"]:
            raise SystemExit(f"{s['file']}: {len(part)} tokens, the manifest says {s['tokens']}")
    return np.concatenate(parts).astype(np.int64), m["vocab_size"]


class Block(nn.Module):
    def __init__(self, d, h, bias):
        super().__init__()
        self.h = h
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.attn_proj = nn.Linear(d, d, bias=bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.mlp_proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, d, bias):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=bias)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for blk in self.h:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    mc, tc = cfg["model"], cfg["train"]
    threads = args.threads or tc.get("threads") or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(tc["seed"])
    start = time.time()
    train, vocab = shards(cfg["data"]["dir"], "train")
    val, _ = shards(cfg["data"]["dir"], "val")
    train, val = torch.from_numpy(train), torch.from_numpy(val)
    T, B = mc["block_size"], tc["batch_size"]
    model = GPT(vocab, T, mc["n_layer"], mc["n_head"], mc["n_embd"], mc["bias"])
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=tc["lr"], betas=(tc["beta1"], tc["beta2"]), eps=1e-8,
    )
    W, D = tc["warmup_steps"], tc.get("decay_steps") or tc["max_steps"]

    def lr_at(s):
        if s < W:
            return tc["lr"] * (s + 1) / (W + 1)
        if s > D:
            return tc["min_lr"]
        c = 0.5 * (1 + math.cos(math.pi * (s - W) / (D - W)))
        return tc["min_lr"] + c * (tc["lr"] - tc["min_lr"])

    def batch(data):
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
        return x, y

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = [model(*batch(val)).item() for _ in range(tc["eval_batches"])]
        model.train()
        return sum(losses) / len(losses)

    history = [(0, evaluate())]
    step_time = 0.0
    for step in range(tc["max_steps"]):
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        for _ in range(tc["grad_accum"]):
            loss = model(*batch(train)) / tc["grad_accum"]
            loss.backward()
        if tc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        step_time += time.time() - t0
        done = step + 1
        if (tc["eval_interval"] and done % tc["eval_interval"] == 0) or done == tc["max_steps"]:
            history.append((done, evaluate()))
            print(f"step {done}: validation loss {history[-1][1]:.4f}", file=sys.stderr)
    wall = time.time() - start
    steps = tc["max_steps"]
    tokens = steps * B * T * tc["grad_accum"]
    print(json.dumps({
        "engine": "pytorch",
        "torch": torch.__version__,
        "threads": threads,
        "val_loss": history[-1][1],
        "val_history": history,
        "wall_seconds": wall,
        "ms_per_step": 1e3 * step_time / steps,
        "tokens_per_second": tokens / step_time,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
