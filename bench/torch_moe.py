"""A Mixture-of-Experts feed-forward layer in PyTorch, gather/scatter style (as MegaBlocks'
reference and most nanoGPT MoE ports write it): the reference anneal's MoE layer is tested and
benchmarked against.

Routing is the one anneal documents: softmax router in float32 (or float64), top-k experts per
token (gates renormalised over the k chosen when k >= 2), expert capacity
ceil(factor * k * tokens / experts) with every first choice placed before any second choice, each
in position order; assignments over capacity are dropped. Losses: Switch's balancing loss
alpha * E * sum_i f_i * P_i (f_i the share of the tokens * k assignments routed to expert i before
capacity, P_i the mean router probability) and ST-MoE's z-loss beta * mean(logsumexp(logits)^2).

As a benchmark (`python3 bench/torch_moe.py`) it times forward + backward of the layer against
the dense GPT-2 MLP of the same active FLOPs, with the shapes `anneal bench moe` uses, and prints
one JSON line per case.
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F


def route(probs, k, capacity):
    """(choice [N, k], keep [N, k] bool, wanted [E]) for router probabilities [N, E]."""
    n, e = probs.shape
    choice = torch.topk(probs, k, dim=1).indices  # best first
    order = choice.t().reshape(-1)  # every first choice, then every second, ...
    onehot = F.one_hot(order, e)
    slot = (onehot.cumsum(0) - 1).gather(1, order[:, None])[:, 0]
    keep = torch.ones_like(slot, dtype=torch.bool) if capacity is None else slot < capacity
    wanted = onehot.sum(0)
    return choice, keep.reshape(k, n).t(), wanted


def moe_forward(x, router, w1, b1, w2, b2, k, capacity_factor, aux, zc):
    """y [N, d], balance, z for tokens x [N, d]; the experts are proj(gelu_tanh(fc(x)))."""
    n, d = x.shape
    e = router.shape[1]
    logits = x.to(router.dtype) @ router
    probs = logits.softmax(-1)
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * k * n / e)
    choice, keep, wanted = route(probs.detach(), k, capacity)
    gates = probs.gather(1, choice)
    if k > 1:
        gates = gates / gates.sum(1, keepdim=True)
    y = torch.zeros_like(x)
    # One product per expert over the rows routed to it, first choices first.
    for i in range(e):
        rows = []
        for c in range(k):
            sel = torch.nonzero((choice[:, c] == i) & keep[:, c])[:, 0]
            rows.append((sel, torch.full_like(sel, c)))
        tok = torch.cat([r[0] for r in rows])
        cho = torch.cat([r[1] for r in rows])
        if tok.numel() == 0:
            continue
        h = F.gelu(x[tok] @ w1[i] + b1[i], approximate="tanh")
        out = h @ w2[i] + b2[i]
        y = y.index_add(0, tok, gates[tok, cho][:, None].to(out.dtype) * out)
    f = wanted.to(probs.dtype) / (n * k)
    balance = aux * e * (f * probs.mean(0)).sum()
    z = zc * (torch.logsumexp(logits, -1) ** 2).mean()
    return y, balance, z


def dense_forward(x, w1, b1, w2, b2):
    return F.gelu(x @ w1 + b1, approximate="tanh") @ w2 + b2


def bench(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d = args.tokens, args.d
    results = []
    cases = [("dense", 1, 1, 4 * d)] + [
        (f"moe{e}-top{k}", e, k, 4 * d // k) for (e, k) in [(8, 1), (16, 1), (8, 2)]
    ]
    for name, e, k, h in cases:
        x = torch.randn(n, d, requires_grad=True)
        w1 = (torch.randn(e, d, h) * 0.02).requires_grad_()
        b1 = torch.zeros(e, h, requires_grad=True)
        w2 = (torch.randn(e, h, d) * 0.02).requires_grad_()
        b2 = torch.zeros(e, d, requires_grad=True)
        router = (torch.randn(d, e) * 0.02).requires_grad_()
        gy = torch.randn(n, d)

        def step():
            if name == "dense":
                y = dense_forward(x, w1[0], b1[0], w2[0], b2[0])
                loss = (y * gy).sum()
            else:
                y, bal, z = moe_forward(x, router, w1, b1, w2, b2, k, args.capacity_factor, 1e-2, 1e-3)
                loss = (y * gy).sum() + bal + z
            loss.backward()
            for t in (x, w1, b1, w2, b2, router):
                t.grad = None

        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        times.sort()
        results.append({"case": name, "ms": 1e3 * times[len(times) // 2]})
        print(json.dumps({"engine": "pytorch", **results[-1]}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument(
        "--capacity-factor",
        type=lambda v: None if v == "none" else float(v),
        default=1.25,
        help='capacity factor in training, or "none" (dropless)',
    )
    bench(p.parse_args())
