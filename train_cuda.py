"""
arun training file, PyTorch engine. The research agent edits this file, and only this file.

One GPT, one optimizer, one fixed time budget. Reads like upstream's train.py
(karpathy/autoresearch): hyperparameters, model, optimizer, training loop,
then the fixed finish (causality probe, val_bpb, summary) in engines/run.py.

    python train_cuda.py                 # NVIDIA GPU
    ARUN_DEVICE=cpu python train_cuda.py # explicit CPU device (tests, no GPU)
"""

import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import gc
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engines.cuda import ENGINE
from engines.run import StepLog, env_seed, fail_fast, finish_run
from engines.timer import TimeBudget
from prepare import TIME_BUDGET, PreparedData, make_dataloader

# --- hyperparameters ---
# Model architecture
DEPTH = 8                  # transformer layers
ASPECT_RATIO = 64          # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128             # attention head dimension
WINDOW_PATTERN = "SSSL"    # per-layer attention window: S = half context, L = full (last layer always L)
# Optimization
TOTAL_BATCH_SIZE = 2**19   # tokens per optimizer step
DEVICE_BATCH_SIZE = 128    # rows per forward/backward (lower it if out of memory)
EVAL_BATCH_SIZE = 128      # rows per evaluation forward
EMBEDDING_LR = 0.6         # token and value embeddings (AdamW)
UNEMBEDDING_LR = 0.004     # lm_head (AdamW)
MATRIX_LR = 0.04           # transformer matrices (Muon)
SCALAR_LR = 0.5            # per-layer residual scalars (AdamW)
WEIGHT_DECAY = 0.2         # cautious weight decay for Muon, annealed to 0
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0         # fraction of the budget spent warming the LR up
WARMDOWN_RATIO = 0.5       # fraction of the budget spent cooling the LR down
FINAL_LR_FRAC = 0.0        # LR at the end, as a fraction of the peak
# Run
SEED = 42
WARMUP_STEPS = 10          # steps not counted against the budget (torch.compile warm-up)
COMPILE = True             # torch.compile on CUDA (ignored on the CPU)
# --- end hyperparameters ---

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


def build_config(vocab_size: int, sequence_len: int) -> GPTConfig:
    model_dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    n_head = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=DEPTH, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=WINDOW_PATTERN)


def norm(x):
    return F.rms_norm(x, (x.size(-1),), eps=1e-6)


def has_value_embedding(layer, n_layer):
    # alternate layers, always including the last
    return layer % 2 == (n_layer - 1) % 2


def rotary(x, cos, sin):
    # split-halves RoPE, same sign convention as upstream
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def window_sizes(config):
    """Left window per layer: a query sees itself and this many earlier tokens."""
    sizes = {"L": config.sequence_len, "S": config.sequence_len // 2}
    out = [sizes[config.window_pattern[i % len(config.window_pattern)]] for i in range(config.n_layer)]
    out[-1] = config.sequence_len
    return out


def _flash_attention_3():
    """FA3 only when the user already installed it: nothing is downloaded at run time."""
    try:
        import flash_attn_interface
        return flash_attn_interface
    except ImportError:
        return None


class Attention:
    """Causal (optionally sliding-window) attention through PyTorch's own kernels, built once per shape."""

    def __init__(self, seq_len, windows, device):
        self.seq_len, self.device = seq_len, device
        self.fa3 = _flash_attention_3() if device.type == "cuda" else None
        self.flex = None
        self.cache = {}
        if device.type == "cuda" and self.fa3 is None:
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                self.flex, self.create_block_mask = flex_attention, create_block_mask
            except ImportError:
                pass
        for w in set(windows):  # built here, once, not inside the compiled graph
            if w < seq_len - 1:
                self.mask(seq_len, w)

    def mask(self, T, window):
        key = (T, window)
        if key not in self.cache:
            if self.flex is not None:
                def sliding(b, h, qi, ki):
                    return (qi >= ki) & (qi - ki <= window)
                self.cache[key] = self.create_block_mask(sliding, None, None, T, T, device=self.device)
            else:
                self.cache[key] = self.dense_mask(T, window)
        return self.cache[key]

    def dense_mask(self, T, window):
        i = torch.arange(T, device=self.device)
        d = i[:, None] - i[None, :]
        return (d >= 0) & (d <= window)

    def __call__(self, q, k, v, window):
        # q, k, v: (B, T, H, D)
        T = q.shape[1]
        if self.fa3 is not None:
            return self.fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if window >= T - 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.flex is not None:
            y = self.flex(q, k, v, block_mask=self.mask(T, window))
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(T, window))
        return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, window, attention):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # value residual: the value embedding enters through an input-dependent gate per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        # one dtype for the attention kernel (under autocast v is bf16, the norms may not be)
        q, k = norm(rotary(q, cos, sin)).to(v.dtype), norm(rotary(k, cos, sin)).to(v.dtype)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=2)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=2)
        y = attention(q, k, v, window)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, attention):
        x = x + self.attn(norm(x), ve, cos, sin, window, attention)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.windows = window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        self.attention = None  # set by init_weights, once the device is known

    @torch.no_grad()
    def init_weights(self, embedding_dtype=torch.float32):
        c = self.config
        device = self.lm_head.weight.device
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * c.n_embd**-0.5  # uniform bound with the std of 1/sqrt(n_embd)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate 2*sigmoid(0) = 1: neutral
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.transformer.wte.to(dtype=embedding_dtype)
        for ve in self.value_embeds.values():
            ve.to(dtype=embedding_dtype)
        self.setup_runtime(device)

    def setup_runtime(self, device):
        """Rotary tables and attention kernels: buffers that are not parameters."""
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32, device=device), inv_freq)
        self.cos, self.sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
        self.attention = Attention(self.config.sequence_len, self.windows, device)

    def forward(self, idx):
        """Logits (B, T, V) in float32 for token ids idx (B, T). The model never sees targets."""
        T = idx.shape[1]
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], self.attention)
        logits = self.lm_head(norm(x)).float()
        return 15 * torch.tanh(logits / 15)  # soft cap

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight, plus attention over each layer's window."""
        embeddings = self.transformer.wte.weight.numel() + sum(v.weight.numel() for v in self.value_embeds.values())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        head_dim = self.config.n_embd // self.config.n_head
        attention = sum(12 * self.config.n_head * head_dim * min(w, self.config.sequence_len) for w in self.windows)
        return 6 * (self.num_params() - embeddings - scalars) + attention


def export_weights(model):
    return {name: p.detach().float().cpu().numpy() for name, p in model.named_parameters()}


@torch.no_grad()
def import_weights(model, weights):
    params = dict(model.named_parameters())
    missing = set(params) ^ set(weights)
    if missing:
        raise KeyError(f"weights do not match the model: {sorted(missing)[:5]}")
    for name, p in params.items():
        p.copy_(torch.from_numpy(np.asarray(weights[name])).to(p.dtype))


def training_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1).long())


# ---------------------------------------------------------------------------
# Optimizer: Muon for the block matrices, AdamW for everything else
# ---------------------------------------------------------------------------

# Polar Express coefficients (5 Newton–Schulz-style iterations toward the orthogonal polar factor).
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt() + eps
    p.add_(-(lr / (1 - beta1 ** step)) * exp_avg / denom)


def muon_update(grads, params, momentum_buf, second_buf, momentum, lr, wd, beta2, red_dim: int):
    # Nesterov momentum
    momentum_buf.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buf, momentum)
    # orthogonalize in float32: bf16 norms overflow on large matrices
    X = g.float()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS:
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    # NorMuon: per-row (or column) second moment, renormalized to keep the update's norm
    v_mean = X.square().mean(dim=red_dim, keepdim=True)
    n = X.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_buf.lerp_(v_mean.to(second_buf.dtype), 1 - beta2)
    step_size = second_buf.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * n) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    update = (X * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))).to(params.dtype)
    # cautious weight decay: only where the update and the weight agree in sign
    mask = (update * params) >= 0
    params.sub_(lr * update + lr * wd * params * mask)


class MuonAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups, compiled):
        super().__init__(param_groups, defaults={})
        self.adamw_fn = torch.compile(adamw_update, dynamic=False, fullgraph=True) if compiled else adamw_update
        self.muon_fn = torch.compile(muon_update, dynamic=False, fullgraph=True) if compiled else muon_update
        # 0-D host tensors: changing values must not trigger recompiles
        self.t = {k: torch.tensor(0.0) for k in ("step", "lr", "b1", "b2", "eps", "wd", "mom")}

    def _set(self, **values):
        for k, v in values.items():
            self.t[k].fill_(v)
        return self.t

    def _adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
            st["step"] += 1
            t = self._set(step=st["step"], lr=group["lr"], b1=group["betas"][0], b2=group["betas"][1],
                          eps=group["eps"], wd=group["weight_decay"])
            self.adamw_fn(p, p.grad, st["m"], st["v"], t["step"], t["lr"], t["b1"], t["b2"], t["eps"], t["wd"])

    def _muon(self, group):
        params = group["params"]
        p0 = params[0]
        st = self.state[p0]
        rows, cols = p0.shape[-2], p0.shape[-1]
        if not st:
            st["momentum"] = torch.zeros(len(params), *p0.shape, dtype=p0.dtype, device=p0.device)
            shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            st["second"] = torch.zeros(shape, dtype=torch.float32, device=p0.device)
        grads = torch.stack([p.grad for p in params])
        stacked = torch.stack(params)
        t = self._set(mom=group["momentum"], lr=group["lr"] * max(1.0, rows / cols) ** 0.5,
                      wd=group["weight_decay"], b2=group["beta2"])
        self.muon_fn(grads, stacked, st["momentum"], st["second"], t["mom"], t["lr"], t["wd"], t["b2"],
                     -1 if rows >= cols else -2)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (self._muon if group["kind"] == "muon" else self._adamw)(group)


def build_optimizer(model, compiled=False):
    scale = (model.config.n_embd / 768) ** -0.5  # AdamW LRs were tuned at width 768
    matrices = list(model.transformer.h.parameters())

    def adamw(params, lr, betas=ADAM_BETAS):
        return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=0.0)

    groups = [
        adamw(list(model.lm_head.parameters()), UNEMBEDDING_LR * scale),
        adamw(list(model.transformer.wte.parameters()), EMBEDDING_LR * scale),
        adamw(list(model.value_embeds.parameters()), EMBEDDING_LR * scale),
        adamw([model.resid_lambdas], SCALAR_LR * 0.01),
        adamw([model.x0_lambdas], SCALAR_LR, betas=(0.96, 0.95)),
    ]
    for shape in sorted({p.shape for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=MATRIX_LR,
                           momentum=0.95, beta2=0.95, weight_decay=WEIGHT_DECAY))
    groups = [g for g in groups if g["params"]]
    optimizer = MuonAdamW(groups, compiled)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    return optimizer


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def set_schedules(optimizer, progress, step):
    lrm = lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(step)
            group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
    return lrm


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def train():
    t_start = time.time()
    ok, why = ENGINE.available()
    if not ok:
        raise SystemExit(f"FAIL: {why}")
    seed = env_seed(SEED)
    torch.manual_seed(seed)
    device = ENGINE.device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")
    compiled = on_gpu and COMPILE
    autocast = torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu)

    data = PreparedData.open()
    vocab_size, seq_len = data.manifest["vocab_size"], data.profile.max_seq_len
    config = build_config(vocab_size, seq_len)
    print(f"Model config: {asdict(config)}")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(embedding_dtype=torch.bfloat16 if on_gpu else torch.float32)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    print(f"Parameters: {num_params:,} | FLOPs per token: {flops_per_token:.3e} | device: {ENGINE.hardware().tag}")

    optimizer = build_optimizer(model, compiled=compiled)
    loss_fn = torch.compile(training_loss, dynamic=False) if compiled else training_loss
    eval_model = torch.compile(model, dynamic=False) if compiled else model

    tokens_per_micro = DEVICE_BATCH_SIZE * seq_len
    if TOTAL_BATCH_SIZE % tokens_per_micro:
        raise SystemExit(f"FAIL: TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE*seq_len {tokens_per_micro}")
    grad_accum = TOTAL_BATCH_SIZE // tokens_per_micro
    loader = make_dataloader(DEVICE_BATCH_SIZE, seq_len, seed=seed)
    x, y, epoch = next(loader)
    x, y = ENGINE.to_device(x), ENGINE.to_device(y)
    budget = TimeBudget(TIME_BUDGET, warmup_steps=WARMUP_STEPS, sync=ENGINE.sync)
    log = StepLog()
    print(f"Time budget: {budget.seconds:.0f}s | grad accumulation: {grad_accum} | startup: {time.time() - t_start:.1f}s")
    t_first_step = time.time()

    while not budget.done:
        budget.start_step()
        for _ in range(grad_accum):
            with autocast:
                loss = loss_fn(model, x, y)
            (loss / grad_accum).backward()
            x, y, epoch = next(loader)
            x, y = ENGINE.to_device(x), ENGINE.to_device(y)
        lrm = set_schedules(optimizer, budget.progress, budget.step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_value = loss.item()
        fail_fast(loss_value, budget.step)
        dt = budget.end_step()
        mfu = ENGINE.peak_flops() and 100 * flops_per_token * TOTAL_BATCH_SIZE / dt / ENGINE.peak_flops()
        log(budget, loss_value, TOTAL_BATCH_SIZE, dt, mfu, epoch, force=budget.step <= 1)
        if budget.step == 1:
            gc.collect()
            gc.freeze()   # Python's GC otherwise stalls steps for hundreds of ms
            gc.disable()

    model.eval()

    def logits_fn(idx):
        with torch.no_grad(), autocast:
            return eval_model(idx)

    def save_weights(path):
        np.savez(path, **export_weights(model))
        path.with_suffix(".json").write_text(json.dumps({"config": asdict(config)}))

    finish_run(ENGINE, logits_fn, budget=budget, t_start=t_start, tokens_per_step=TOTAL_BATCH_SIZE,
               num_params=num_params, flops_per_token=flops_per_token, depth=DEPTH, eval_batch_size=EVAL_BATCH_SIZE,
               vocab_size=vocab_size, config=asdict(config), seed=seed, save_weights=save_weights,
               extra={"startup_seconds": t_first_step - t_start, "compile": compiled})


if __name__ == "__main__":
    train()
