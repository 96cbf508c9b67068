"""
arun pretraining script for PyTorch (NVIDIA GPUs through CUDA; an explicit CPU device for tests).
Single device, single file: the file the research agent edits.

The model family and optimizer follow karpathy/autoresearch's train.py (GPT with
value embeddings, sliding windows, ReLU^2 MLP, softcapped logits; Muon + AdamW),
with upstream's parameter names, so weights move between engines.

train_mlx.py has the same skeleton: the same sections, top-level names in the same order and the
same constants (tests/test_skeleton.py), so a change to one ports to the other by name.

Plumbing lives in engines/: attention kernels (engines.torch_attention), and the end of the
run (engines.run.finish_run: exports the forward the evaluator scores; summary), called once
after training.

Usage: python train_cuda.py                    (the harness: arun --backend cuda)
       ARUN_DEVICE=cpu python train_cuda.py    (explicit CPU device: no compile, float32)
Environment (set by the harness): ARUN_DATA_DIR, ARUN_TIME_BUDGET, ARUN_RESULT_JSON,
ARUN_ARTIFACT, ARUN_SEED, ARUN_DEVICE.
"""

import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import gc
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare
from engines.cuda import ENGINE
from engines.run import StepLog, check_export, env_seed, fail_fast, finish_run, mfu_percent
from engines.timer import TimeBudget
from engines.torch_attention import attention, prepare_attention

# --- hyperparameters ---
# Model architecture
DEPTH = 8                # number of transformer layers
ASPECT_RATIO = 64        # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128           # target head dimension for attention
WINDOW_PATTERN = "SSSL"  # sliding window pattern: L = full context, S = half context (last layer always L)

# Batch (tokens per optimizer step, rows per forward/backward; the evaluator picks its own batch size)
TOTAL_BATCH_SIZE = 2**19
DEVICE_BATCH_SIZE = 128  # rows per micro-step (reduce if out of memory)

# Optimization
EMBEDDING_LR = 0.6       # token and value embeddings (Adam)
UNEMBEDDING_LR = 0.004   # lm_head (Adam)
MATRIX_LR = 0.04         # block matrices (Muon)
SCALAR_LR = 0.5          # per-layer scalars (Adam)
WEIGHT_DECAY = 0.2       # cautious weight decay for Muon, decays linearly to 0 with progress
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0       # fraction of the time budget for LR warmup
WARMDOWN_RATIO = 0.5     # fraction of the time budget for LR warmdown
FINAL_LR_FRAC = 0.0      # final LR as a fraction of the initial LR

# Run
SEED = 42                # $ARUN_SEED overrides it
WARMUP_STEPS = 10        # first steps (torch.compile) are not counted against the time budget
COMPILE = True           # torch.compile the model and the optimizer steps (CUDA only; ignored on the CPU)
COMPUTE_DTYPE = "bfloat16"  # activations and matmuls (autocast; weights and optimizer state stay float32), or "float32"; the CPU device runs float32
# --- end hyperparameters ---

RMS_EPS = 1e-6           # rms_norm epsilon, the same in every engine
VE_GATE_CHANNELS = 32    # value-embedding gate reads the first 32 channels of x
SOFTCAP = 15.0
ROPE_BASE = 10000.0


# ---------------------------------------------------------------------------
# GPT model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def build_config(vocab_size: int, sequence_len: int) -> GPTConfig:
    model_dim = ((DEPTH * ASPECT_RATIO + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    n_head = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=DEPTH, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=WINDOW_PATTERN)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)


def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    Rotary embedding over (B, T, H, D), split-halves convention as upstream:
    y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos with angle t / base^(2i/D) (tables: GPT.setup_runtime).
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def window_sizes(config: GPTConfig) -> list[int]:
    """Per-layer left window (keys a query may see behind it, FA3's window_size=(w, 0)); the last layer is full."""
    pattern = config.window_pattern.upper()
    assert pattern and all(c in "SL" for c in pattern), f"WINDOW_PATTERN must use only S and L, got {pattern!r}"
    long_w, short_w = config.sequence_len, config.sequence_len // 2
    sizes = [long_w if pattern[i % len(pattern)] == "L" else short_w for i in range(config.n_layer)]
    sizes[-1] = long_w
    return sizes


class Linear(nn.Linear):
    """torch.nn.Linear(bias=False): weights (out, in) stay fp32; autocast runs the matmul in COMPUTE_DTYPE."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__(num_embeddings, dim)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0
        assert config.n_kv_head <= config.n_head and config.n_head % config.n_kv_head == 0
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window: int):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Value residual (ResFormer): input-dependent gate per kv head, 2*sigmoid(0) = 1 at init
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(rope(q, cos, sin)), norm(rope(k, cos, sin))
        q, k = q.to(v.dtype), k.to(v.dtype)  # one dtype for the kernel (autocast may leave the norms in fp32)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=2)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=2)
        y = attention(q, k, v, window)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window: int):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))


class Transformer(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.windows = window_sizes(config)
        self.transformer = Transformer(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        self.attention: str | None = None  # the kernel's name, once setup_runtime() has built its masks
        if self.lm_head.weight.device.type != "meta":  # on the meta device this waits for init_weights
            self.setup_runtime()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As upstream: N(0,1) embeddings, N(0,0.001) head, U(+-sqrt(3/d)) inputs, zero output projections."""
        s = 3 ** 0.5 * self.config.n_embd ** -0.5
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        if self.lm_head.weight.device.type == "cuda" and COMPUTE_DTYPE != "float32":
            # bf16 embedding tables on the GPU, as upstream (half the memory traffic of the lookups)
            self.transformer.wte.to(dtype=getattr(torch, COMPUTE_DTYPE))
            for ve in self.value_embeds.values():
                ve.to(dtype=getattr(torch, COMPUTE_DTYPE))
        self.setup_runtime()

    def setup_runtime(self, attention_kernel: str | None = None) -> None:
        """Rotary tables and attention masks for the device the weights live on (not parameters)."""
        device = self.lm_head.weight.device
        head_dim, t = self.config.n_embd // self.config.n_head, torch.arange(self.config.sequence_len, device=device)
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(t.float(), inv_freq)[None, :, None, :]  # (1, T, 1, D/2): broadcasts over (B, T, H, D/2)
        self.cos, self.sin = freqs.cos(), freqs.sin()
        self.attention = prepare_attention(self.config.sequence_len, self.windows, device, attention_kernel)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> float32 softcapped logits (B, T, V). The model never sees targets."""
        if self.attention is None:
            raise RuntimeError("call model.init_weights() (or setup_runtime()) after moving the model to its device")
        T = idx.shape[1]
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i])
        logits = self.lm_head(norm(x)).float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def num_scaling_params(self) -> dict[str, int]:
        def count(params) -> int:
            return sum(p.numel() for p in params)
        counts = {
            "wte": count(self.transformer.wte.parameters()),
            "value_embeds": count(self.value_embeds.parameters()),
            "lm_head": count(self.lm_head.parameters()),
            "transformer_matrices": count(self.transformer.h.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        return counts

    def estimate_flops(self) -> float:
        """FLOPs per token for forward + backward, as upstream: 6 x matmul params + attention over each window."""
        c = self.config
        counts = self.num_scaling_params()
        matmul_params = counts["transformer_matrices"] + counts["lm_head"]
        head_dim = c.n_embd // c.n_head
        attn = sum(12 * c.n_head * head_dim * min(w, c.sequence_len) for w in self.windows)
        return 6 * matmul_params + attn


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, from fp32 logits."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1).long())


def training_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss training minimizes (the evaluator scores val_bpb from the exported forward instead)."""
    return cross_entropy(model(x), y)


# ---------------------------------------------------------------------------
# Optimizer: Muon for the block matrices, AdamW for everything else
# ---------------------------------------------------------------------------

POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
NS_STEPS = 5
MUON_BETA2 = 0.95
ADAM_EPS = 1e-10


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    denom = (exp_avg_sq / (1 - beta2_t ** step_t)).sqrt() + eps_t
    p.add_(-(lr_t / (1 - beta1_t ** step_t)) * (exp_avg / denom))


def polar_express(X: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximate orthogonal polar factor of a stack of matrices (n, rows, cols), in float32
    (bf16 here would make the update differ between engines and overflow norms of large matrices)."""
    X = X.float()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
              momentum_t, lr_t, wd_t, beta2_t, red_dim: int):
    # Nesterov momentum
    momentum_buffer.lerp_(stacked_grads, 1 - momentum_t)
    g = polar_express(stacked_grads.lerp_(momentum_buffer, momentum_t))
    # NorMuon: per-row (or per-column) second moment, renormalized to keep the update's norm
    v_mean = g.square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2_t)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))
    # Cautious weight decay: decay only where the update and the weight agree in sign
    g = g.to(stacked_params.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr_t * g + lr_t * wd_t * stacked_params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """Upstream's combined optimizer: Muon for 2-D block matrices (stacked per shape), AdamW for the rest."""

    def __init__(self, param_groups: list[dict], compile_steps: bool = False):
        super().__init__(param_groups, defaults={})
        self.compiled = compile_steps
        self._adamw = torch.compile(adamw_step, dynamic=False, fullgraph=True) if compile_steps else adamw_step
        self._muon = torch.compile(muon_step, dynamic=False, fullgraph=True) if compile_steps else muon_step
        # Compiled: 0-D host tensors, so new values each step do not trigger recompiles.
        # Eager: plain floats (a CPU tensor cannot be an operand of some in-place CUDA ops).
        self._t = {k: torch.tensor(0.0, dtype=torch.float32) for k in ("step", "lr", "b1", "b2", "eps", "wd", "mom")}

    def _set(self, **values: float) -> dict:
        if not self.compiled:
            return values
        for k, v in values.items():
            self._t[k].fill_(v)
        return self._t

    def _step_adamw(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = self._set(step=state["step"], lr=group["lr"], b1=group["betas"][0], b2=group["betas"][1],
                          eps=group["eps"], wd=group["weight_decay"])
            self._adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                        t["step"], t["lr"], t["b1"], t["b2"], t["eps"], t["wd"])

    def _step_muon(self, group: dict) -> None:
        params = group["params"]
        p = params[0]
        state = self.state[p]
        rows, cols = p.shape[-2], p.shape[-1]
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=p.dtype, device=p.device)
            shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        stacked_grads = torch.stack([q.grad for q in params])
        stacked_params = torch.stack(params)
        t = self._set(mom=group["momentum"], lr=group["lr"] * max(1.0, rows / cols) ** 0.5,
                      wd=group["weight_decay"], b2=group["beta2"])
        self._muon(stacked_grads, stacked_params, state["momentum_buffer"], state["second_momentum_buffer"],
                   t["mom"], t["lr"], t["wd"], t["b2"], -1 if rows >= cols else -2)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._step_muon(group)
            else:
                self._step_adamw(group)


def build_optimizer(model: GPT, compile_steps: bool = False) -> MuonAdamW:
    """The optimizer from this file's constants: AdamW groups as upstream, one Muon group per matrix shape."""
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5  # AdamW LRs were tuned at width 768
    print(f"Scaling AdamW LRs by 1/sqrt({model.config.n_embd}/768) = {dmodel_lr_scale:.6f}")

    def adamw(params: list, lr: float, betas: tuple[float, float] = ADAM_BETAS) -> dict:
        return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=ADAM_EPS, weight_decay=0.0)

    matrices = list(model.transformer.h.parameters())
    groups = [
        adamw(list(model.lm_head.parameters()), UNEMBEDDING_LR * dmodel_lr_scale),
        adamw(list(model.transformer.wte.parameters()), EMBEDDING_LR * dmodel_lr_scale),
        adamw(list(model.value_embeds.parameters()), EMBEDDING_LR * dmodel_lr_scale),
        adamw([model.resid_lambdas], SCALAR_LR * 0.01),
        adamw([model.x0_lambdas], SCALAR_LR, betas=(0.96, 0.95)),
    ]
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=MATRIX_LR,
                           momentum=0.95, beta2=MUON_BETA2, weight_decay=WEIGHT_DECAY))
    groups = [g for g in groups if g["params"]]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())), "a parameter has no optimizer group"
    optimizer = MuonAdamW(groups, compile_steps=compile_steps)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def get_lr_multiplier(progress: float) -> float:
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step: int) -> float:
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress: float) -> float:
    return WEIGHT_DECAY * (1 - progress)


def set_schedules(optimizer: MuonAdamW, progress: float, step: int) -> float:
    """LR multiplier from the budget's progress, Muon momentum warm-up by step, weight decay annealed to 0."""
    lrm = get_lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = get_muon_momentum(step)
            group["weight_decay"] = get_weight_decay(progress)
    return lrm


def make_train_step(model: GPT, optimizer: MuonAdamW, grad_accum_steps: int, compile: bool = False):
    """
    step(batches, progress, step) -> loss of the last micro-batch (a device scalar, not read here).
    One optimizer step over `grad_accum_steps` (x, y) device micro-batches: forward and backward
    under autocast (the compiled loss fuses the softcap with the cross-entropy), then the schedules
    and the Muon+AdamW update. Nothing here waits for the device.
    """
    loss_fn = torch.compile(training_loss, dynamic=False) if compile else training_loss
    device = model.lm_head.weight.device  # autocast on the GPU (as upstream); plain float32 on the CPU
    autocast = torch.amp.autocast(device_type=device.type, dtype=getattr(torch, COMPUTE_DTYPE),
                                  enabled=device.type == "cuda" and COMPUTE_DTYPE != "float32")

    def step(batches: list[tuple[torch.Tensor, torch.Tensor]], progress: float, step: int) -> torch.Tensor:
        assert len(batches) == grad_accum_steps, f"expected {grad_accum_steps} micro-batches, got {len(batches)}"
        for x, y in batches:
            with autocast:
                loss = loss_fn(model, x, y)
            (loss / grad_accum_steps).backward()
        set_schedules(optimizer, progress, step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def train() -> None:
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
    compiled = on_gpu and COMPILE  # on the CPU: eager float32, so tests start in seconds

    data = prepare.PreparedData.open()
    seq_len = data.profile.max_seq_len
    vocab_size = prepare.Tokenizer.from_directory(data.dir).get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")
    config = build_config(vocab_size, seq_len)
    print(f"Model config: {asdict(config)}")

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    print(f"Device: {ENGINE.hardware().device} ({device}), attention: {model.attention}, "
          f"compute dtype {COMPUTE_DTYPE if on_gpu else 'float32'}, compile: {compiled}")
    param_counts = model.num_scaling_params()
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    flops_per_token = model.estimate_flops()
    print(f"Estimated FLOPs per token: {flops_per_token:e}")
    export_check_seconds = check_export(ENGINE, model)  # a forward the evaluator would refuse stops here, in seconds

    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * seq_len
    if TOTAL_BATCH_SIZE % tokens_per_fwdbwd:
        raise SystemExit(f"FAIL: TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE x "
                         f"MAX_SEQ_LEN = {DEVICE_BATCH_SIZE} x {seq_len}; change one of them")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd
    optimizer = build_optimizer(model, compile_steps=compiled)
    train_step = make_train_step(model, optimizer, grad_accum_steps, compile=compiled)
    forward = torch.compile(model, dynamic=False) if compiled else model

    loader = prepare.make_dataloader(DEVICE_BATCH_SIZE, seq_len, "train", seed=seed)

    def next_batches() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        batches, epoch = [], 1
        for _ in range(grad_accum_steps):
            x, y, epoch = next(loader)
            batches.append((ENGINE.to_device(x), ENGINE.to_device(y)))
        return batches, epoch

    budget = TimeBudget(prepare.TIME_BUDGET, warmup_steps=WARMUP_STEPS, sync=ENGINE.sync)
    print(f"Time budget: {budget.seconds:g}s (after {WARMUP_STEPS} warm-up steps)")
    print(f"Gradient accumulation steps: {grad_accum_steps}")

    log = StepLog()
    peak = ENGINE.peak_flops()
    batches, epoch = next_batches()
    t_first_step = time.time()
    while not budget.done:
        budget.start_step()
        loss = train_step(batches, budget.progress, budget.step)
        batches, next_epoch = next_batches()  # packed and copied while the device computes this step
        dt = budget.end_step()
        # end_step() synchronized the device, so reading the loss here costs no extra stall
        loss_f = loss.item()
        fail_fast(loss_f, budget.step)
        log(budget, loss_f, TOTAL_BATCH_SIZE, dt, mfu_percent(flops_per_token, TOTAL_BATCH_SIZE, dt, peak), epoch,
            force=budget.step == 1 or budget.done)
        epoch = next_epoch
        if budget.step == 1:
            gc.collect()   # Python's GC causes ~500 ms stalls; nothing cyclic is created per step
            gc.freeze()
            gc.disable()

    finish_run(ENGINE, model, forward, budget=budget, t_start=t_start, tokens_per_step=TOTAL_BATCH_SIZE,
               flops_per_token=flops_per_token, seed=seed, constants=globals(),
               extra={"grad_accum_steps": grad_accum_steps, "export_check_seconds": export_check_seconds,
                      "startup_seconds": t_first_step - t_start,
                      "compile": compiled, "attention": model.attention, "device": str(device)})


if __name__ == "__main__":
    train()
