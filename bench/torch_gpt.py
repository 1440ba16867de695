"""PyTorch eager reference for `anneal bench gpt`: the same GPT-2 model, batch and optimizer.

Prints one JSON line in the format of the anneal benchmark workers. Run directly:

    python3 bench/torch_gpt.py --threads 2

With --lockstep (used by `anneal bench gpt --lockstep`) it warms up, prints `ready`, then runs one
timed step for each `step` line on standard input, answering with its time in ms, and prints the
JSON result at `done`.

With --profile it times the steps under torch.profiler and prints, per step, the time in matrix
products, in fused attention and in everything else, then the ten costliest ops (on standard
error), to set beside `anneal bench gpt --profile`.

With --dtype bf16 the forward runs under CPU autocast to bfloat16 (PyTorch's mixed precision: f32
weights and optimizer, bf16 matrix products and their backward), the reference for anneal's bf16.
"""

import argparse
import json
import math
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, ctx, layers, d, heads):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for blk in self.h:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()  # tied head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def report_profile(prof, steps, step_s):
    """Per-step ms of the profiled ops' own time: matrix products, attention, the rest."""
    ops = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    ops.sort(key=lambda kv: -kv[1])
    products = sum(ms for k, ms in ops if k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"))
    attention = sum(ms for k, ms in ops if "scaled_dot_product" in k or "attention" in k)
    total = sum(ms for _, ms in ops)
    err = sys.stderr
    print(f"per step: {step_s * 1e3:.1f} ms; ops' own time {total:.1f} ms: matrix products {products:.1f}, "
          f"attention {attention:.1f}, everything else {total - products - attention:.1f}", file=err)
    for k, ms in ops[:10]:
        print(f"  {k[:60]:<60} {ms:8.1f} ms/step", file=err)


def main():
    p = argparse.ArgumentParser()
    for name, default in [("steps", 10), ("warmup", 3), ("threads", 2), ("batch", 8), ("seq", 256),
                          ("layers", 4), ("width", 256), ("heads", 4), ("vocab", 512)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--json", action="store_true")
    p.add_argument("--lockstep", action="store_true")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1337)
    model = GPT(a.vocab, a.seq, a.layers, a.width, a.heads)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, foreach=True)
    def step():
        idx = torch.randint(0, a.vocab, (a.batch, a.seq))
        targets = (idx * 7 + 3) % a.vocab
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = model(idx, targets)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, loss

    times, loss = [], None
    if a.lockstep:
        for _ in range(a.warmup):
            _, loss = step()
        print("ready", flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "done":
                break
            if cmd != "step":
                raise SystemExit(f"lock-step worker: unexpected command {cmd!r}")
            dt, loss = step()
            times.append(dt)
            print(dt * 1e3, flush=True)
    elif a.profile:
        from torch.profiler import ProfilerActivity, profile
        for _ in range(a.warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                dt, loss = step()
                times.append(dt)
        report_profile(prof, a.steps, sum(times) / a.steps)
    else:
        for i in range(a.warmup + a.steps):
            dt, loss = step()
            if i >= a.warmup:
                times.append(dt)
    med = statistics.median(times)
    n = sum(p.numel() for p in model.parameters()) - model.wte.weight.numel() - model.wpe.weight.numel()
    flops = a.batch * a.seq * (6 * n + 12 * a.layers * a.seq * a.width)
    out = dict(engine="pytorch", dtype=a.dtype, ms_per_step=med * 1e3, ms_min=min(times) * 1e3, ms_max=max(times) * 1e3, tokens_per_s=a.batch * a.seq / med,
               gflops=flops / med / 1e9, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               final_loss=loss.item())
    if a.lockstep:
        out["step_ms"] = [t * 1e3 for t in times]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
