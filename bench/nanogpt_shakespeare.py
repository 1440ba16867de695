#!/usr/bin/env python3
"""nanoGPT's own recipe for its shakespeare_char example, on anneal's shards.

Recipe source: Andrej Karpathy's nanoGPT (https://github.com/karpathy/nanoGPT, `train.py`,
`model.py`, `config/train_shakespeare_char.py`), as its README runs it on a CPU:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False \
        --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 \
        --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

This is a re-implementation written from reading that code, not a copy of it. It is meant to
reproduce nanoGPT's run step for step: the modules are built and initialised in nanoGPT's order
so that, from the same seed, the initial weights and the stream of random batches are the ones
nanoGPT would draw (given the same token stream; nanoGPT reads one uint16 train.bin, this reads
anneal's manifest and u16/u32 shards, concatenated in manifest order).

    python3 bench/nanogpt_shakespeare.py --config configs/shakespeare-char.toml \
        [--set section.key=value ...] [--threads N] [--log-interval N]

Command line and output are those of bench/torch_pretrain.py (the same JSON keys on one line of
stdout; progress goes to stderr), so either script can be run by `anneal bench pretrain`.

Values come from the run config TOML where nanoGPT has the same knob:
  model.n_layer/n_head/n_embd/block_size/dropout/bias  -> n_layer, n_head, n_embd, block_size,
      dropout, bias (the shakespeare config sets no bias, so train.py's default bias=False holds)
  train.batch_size, grad_accum -> batch_size, gradient_accumulation_steps
  train.lr, min_lr, warmup_steps -> learning_rate, min_lr, warmup_iters
  train.max_steps -> max_iters; train.decay_steps (or max_steps when absent/0) -> lr_decay_iters
  train.beta1, beta2, weight_decay, grad_clip -> beta1, beta2, weight_decay, grad_clip
  train.eval_interval -> eval_interval; train.eval_batches -> eval_iters (batches per split)
  train.seed -> the torch.manual_seed value (nanoGPT hard-codes 1337; the TOML also says 1337)
  train.threads (or --threads) -> torch.set_num_threads (nanoGPT leaves torch's default)
model.tie_embeddings must be true and model.dtype "f32": nanoGPT always ties the head to the
token embedding and runs float32 on the CPU. decay_lr is always on, as in the config.

Where nanoGPT's recipe differs from bench/torch_pretrain.py (anneal's recipe):
  1. GELU: exact erf GELU (nn.GELU()) instead of the tanh approximation.
  2. Weight decay: every parameter with dim >= 2 decays, the token embedding (= tied head) and
     the position embedding included; torch_pretrain exempts wte and wpe.
  3. Steps: the loop runs iterations 0..max_iters inclusive, i.e. max_iters + 1 optimizer steps
     (2,001); the last one (at lr = min_lr) is taken after the last evaluation and never scored.
     ms_per_step and tokens_per_second count all max_iters + 1 steps.
  4. Evaluation: at every iter_num % eval_interval == 0 before that iteration's step (0, 250, ...,
     2000; "step s" = after s optimizer steps, as in torch_pretrain), on eval_iters batches of
     the train split and then eval_iters of the val split. torch_pretrain scores val only, and
     also scores after the last step when max_steps is not a multiple of eval_interval.
     (eval_interval = 0, which nanoGPT cannot run, is taken here as "at 0 and max_iters".)
  5. Random stream: the first train batch is drawn before the step-0 evaluation and each next
     batch right after the forward pass; eval batches of both splits consume the same generator.
     With the different construction order below, the batches differ from torch_pretrain's.
  6. Initialisation: same distributions (normal 0.02; c_proj weights 0.02/sqrt(2 n_layer); zero
     biases; LayerNorm ones), but drawn nanoGPT's way: PyTorch's default Linear/Embedding init
     runs first, then normal_ over modules in order (the tied matrix is drawn twice, the head's
     draw wins), then the c_proj re-draws. Same law, different numbers than torch_pretrain.
  7. Dropout modules (embedding, attention, residual, MLP) exist as in nanoGPT; p = 0 here.
  8. Eval loss average is taken in float32 (a torch.zeros buffer), not Python floats.
  9. No checkpoints are written (nanoGPT saves ckpt.pt when val improves; I/O only).
Identical in both: pre-norm GPT-2 blocks, SDPA causal attention, LayerNorm eps 1e-5 with optional
bias, learned positions, tied head, AdamW(eps 1e-8) with the same lr schedule formula (linear
warm-up (s+1)/(W+1), cosine to min_lr at lr_decay_iters, min_lr after), global-norm clipping,
loss scaled by 1/grad_accum, random windows x = d[i:i+T], y = d[i+1:i+1+T], i < len - T.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# The run config and the shards are read as anneal's own PyTorch reference reads them.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_pretrain import load_config, shards  # noqa: E402


def load_split(data_dir, split):
    """All of a split's shards, concatenated in manifest order, as one int64 tensor."""
    tokens, vocab = shards(data_dir, split)
    return torch.from_numpy(tokens), vocab


class Layer(nn.Module):
    """One pre-norm transformer block. Submodules are registered in nanoGPT's order
    (ln_1, c_attn, c_proj, ln_2, c_fc, c_proj) so parameter order and RNG draws match."""

    def __init__(self, width, heads, bias, p_drop):
        super().__init__()
        self.heads = heads
        self.p_drop = p_drop
        self.norm_attn = nn.LayerNorm(width, eps=1e-5, bias=bias)
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.attn_out = nn.Linear(width, width, bias=bias)
        self.attn_drop = nn.Dropout(p_drop)  # nanoGPT's attn_dropout (unused with SDPA)
        self.resid_drop = nn.Dropout(p_drop)
        self.norm_mlp = nn.LayerNorm(width, eps=1e-5, bias=bias)
        self.fc = nn.Linear(width, 4 * width, bias=bias)
        self.act = nn.GELU()  # exact (erf) GELU, as nanoGPT's MLP
        self.mlp_out = nn.Linear(4 * width, width, bias=bias)
        self.mlp_drop = nn.Dropout(p_drop)

    def attention(self, x):
        b, t, c = x.shape
        per_head = c // self.heads
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.heads, per_head).transpose(1, 2)
        k = k.view(b, t, self.heads, per_head).transpose(1, 2)
        v = v.view(b, t, self.heads, per_head).transpose(1, 2)
        mixed = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.p_drop if self.training else 0.0, is_causal=True
        )
        mixed = mixed.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.attn_out(mixed))

    def forward(self, x):
        x = x + self.attention(self.norm_attn(x))
        return x + self.mlp_drop(self.mlp_out(self.act(self.fc(self.norm_mlp(x)))))


class CharGPT(nn.Module):
    """nanoGPT's GPT: token + position embeddings, dropout, blocks, final norm, tied head."""

    def __init__(self, vocab, context, n_layer, n_head, width, bias, p_drop):
        super().__init__()
        assert width % n_head == 0
        self.context = context
        # Construction order = nanoGPT's (wte, wpe, drop, h, ln_f, lm_head): the default
        # initialisers run here and advance the generator exactly as nanoGPT's do.
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(context, width)
        self.emb_drop = nn.Dropout(p_drop)
        self.layers = nn.ModuleList(Layer(width, n_head, bias, p_drop) for _ in range(n_layer))
        self.norm_out = nn.LayerNorm(width, eps=1e-5, bias=bias)
        self.head = nn.Linear(width, vocab, bias=False)
        self.tok_emb.weight = self.head.weight  # weight tying

        # Re-draw every Linear and Embedding from N(0, 0.02), walking modules in order (the tied
        # matrix is drawn as the embedding and again as the head), zeroing Linear biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # GPT-2's scaled init of the two residual output projections of every block.
        residual_std = 0.02 / math.sqrt(2 * n_layer)
        for layer in self.layers:
            nn.init.normal_(layer.attn_out.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.mlp_out.weight, mean=0.0, std=residual_std)

    def forward(self, idx, targets):
        t = idx.shape[1]
        assert t <= self.context
        positions = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.emb_drop(self.tok_emb(idx) + self.pos_emb(positions))
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm_out(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def make_optimizer(model, weight_decay, lr, betas):
    """nanoGPT's configure_optimizers: decay all tensors with dim >= 2 (matmul weights AND the
    embeddings), none of the 1-D ones (norm weights, biases). Plain (non-fused) AdamW on CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    print(
        f"decayed tensors: {len(matrices)} ({sum(p.numel() for p in matrices):,} parameters), "
        f"not decayed: {len(vectors)} ({sum(p.numel() for p in vectors):,} parameters)",
        file=sys.stderr,
    )
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_schedule(peak, floor, warmup, decay_end):
    def lr_at(it):
        if it < warmup:
            return peak * (it + 1) / (warmup + 1)
        if it > decay_end:
            return floor
        frac = (it - warmup) / (decay_end - warmup)
        return floor + 0.5 * (1.0 + math.cos(math.pi * frac)) * (peak - floor)

    return lr_at


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="run config TOML (e.g. configs/shakespeare-char.toml)")
    ap.add_argument("--set", action="append", default=[], help="section.key=value override")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: train.threads)")
    ap.add_argument("--log-interval", type=int, default=0, help="print the train loss every N iterations")
    args = ap.parse_args()

    cfg = load_config(args.config, args.set)
    mc, tc = cfg["model"], cfg["train"]
    if not mc.get("tie_embeddings", True):
        raise SystemExit("nanoGPT always ties the head to the token embedding; set model.tie_embeddings=true")
    if mc.get("dtype", "f32") != "f32":
        raise SystemExit("nanoGPT on CPU trains in float32; set model.dtype=f32")

    threads = args.threads or tc.get("threads") or os.cpu_count()
    torch.set_num_threads(threads)

    block_size, batch_size = mc["block_size"], tc["batch_size"]
    accum = tc.get("grad_accum", 1)
    max_iters = tc["max_steps"]
    eval_interval = tc["eval_interval"] or max(max_iters, 1)  # 0: evaluate at 0 and max_iters
    eval_iters = tc["eval_batches"]
    warmup = tc["warmup_steps"]
    decay_end = tc.get("decay_steps") or max_iters
    p_drop = mc.get("dropout", 0.0)

    start = time.time()
    data_dir = cfg["data"]["dir"]
    train_tokens, vocab = load_split(data_dir, "train")
    val_tokens, _ = load_split(data_dir, "val")
    splits = {"train": train_tokens, "val": val_tokens}

    torch.manual_seed(tc["seed"])  # nanoGPT: torch.manual_seed(1337), before building the model
    model = CharGPT(vocab, block_size, mc["n_layer"], mc["n_head"], mc["n_embd"], mc["bias"], p_drop)
    n_params = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    print(f"number of parameters: {n_params / 1e6:.2f}M", file=sys.stderr)
    optimizer = make_optimizer(model, tc["weight_decay"], tc["lr"], (tc["beta1"], tc["beta2"]))
    lr_at = lr_schedule(tc["lr"], tc["min_lr"], warmup, decay_end)

    def get_batch(split):
        data = splits[split]
        offsets = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([data[i : i + block_size] for i in offsets])
        y = torch.stack([data[i + 1 : i + 1 + block_size] for i in offsets])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        means = {}
        for split in ("train", "val"):
            buf = torch.zeros(eval_iters)
            for k in range(eval_iters):
                buf[k] = model(*get_batch(split)).item()
            means[split] = buf.mean().item()
        model.train()
        return means

    history = []
    step_seconds = 0.0
    steps_run = 0
    x, y = get_batch("train")  # nanoGPT draws the first batch before the loop
    it = 0
    while True:
        lr = lr_at(it)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if it % eval_interval == 0:
            losses = estimate_loss()
            history.append((it, losses["val"]))
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", file=sys.stderr)

        t0 = time.time()
        for _ in range(accum):
            loss = model(x, y) / accum
            x, y = get_batch("train")  # prefetch the next batch, as nanoGPT does
            loss.backward()
        if tc["grad_clip"] != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds += time.time() - t0
        steps_run += 1

        if args.log_interval and it % args.log_interval == 0:
            print(f"iter {it}: loss {loss.item() * accum:.4f}, lr {lr:.3e}", file=sys.stderr)
        it += 1
        if it > max_iters:  # nanoGPT's termination test: iterations 0..max_iters all step
            break

    wall = time.time() - start
    tokens = steps_run * batch_size * block_size * accum
    print(json.dumps({
        "engine": "pytorch-nanogpt",
        "torch": torch.__version__,
        "threads": threads,
        "val_loss": history[-1][1],
        "val_history": history,
        "wall_seconds": wall,
        "ms_per_step": 1e3 * step_seconds / steps_run,
        "tokens_per_second": tokens / step_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
