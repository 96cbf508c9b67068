"""
arun pretraining script for MLX (Apple Silicon GPU; MLX's CPU backend on Linux, for tests).
Single device, single file: the file the research agent edits.

The model family and optimizer follow karpathy/autoresearch's train.py (GPT with
value embeddings, sliding windows, ReLU^2 MLP, softcapped logits; Muon + AdamW),
with upstream's PyTorch parameter names so weights move between engines.

train_cuda.py has the same skeleton: the same sections, top-level names in the same order and the
same constants (tests/test_skeleton.py), so a change to one ports to the other by name.

Plumbing lives in engines/: attention (engines.mlx_attention), and the end of the run
(engines.run.finish_run: exports the forward the evaluator scores; summary), called once
after training.

Usage: python train_mlx.py        (the harness: arun --backend mlx)
Environment (set by the harness): ARUN_DATA_DIR, ARUN_TIME_BUDGET, ARUN_RESULT_JSON,
ARUN_ARTIFACT, ARUN_SEED.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

import prepare
from engines.mlx import ENGINE
from engines.mlx_attention import attention, prepare_attention
from engines.run import StepLog, check_export, env_seed, fail_fast, finish_run, mfu_percent
from engines.timer import TimeBudget

# --- hyperparameters ---
# Model architecture
DEPTH = 4                # number of transformer layers
ASPECT_RATIO = 64        # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128           # target head dimension for attention
WINDOW_PATTERN = "SSSL"  # sliding window pattern: L = full context, S = half context

# Batch (tokens per optimizer step, rows per forward/backward; the evaluator picks its own batch size)
TOTAL_BATCH_SIZE = 2**16
DEVICE_BATCH_SIZE = 16   # rows per micro-step; 16 x 2048 tokens fits a 16 GB Mac Mini at depth 4

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
WARMUP_STEPS = 3         # first steps (compilation) are not counted against the time budget
COMPILE = True           # mx.compile the forward/backward and the optimizer update
COMPUTE_DTYPE = "bfloat16"  # activations and matmuls (weights and optimizer state stay float32), or "float32"; on every device
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


def norm(x: mx.array) -> mx.array:
    return mx.fast.rms_norm(x, None, RMS_EPS)


def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def rope(x: mx.array) -> mx.array:
    """
    Rotary embedding over (B, H, T, D), split-halves convention as upstream:
    y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos with angle t / base^(2i/D).
    Upstream rotates by -angle where MLX's kernel rotates by +angle, hence scale=-1. MLX's fused
    kernel builds the angles itself, so there are no cos/sin tables to pass (torch: GPT.setup_runtime).
    """
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=ROPE_BASE, scale=-1.0, offset=0)


def window_sizes(config: GPTConfig) -> list[int]:
    """Per-layer left window (keys a query may see behind it); the last layer is always full."""
    pattern = config.window_pattern.upper()
    assert pattern and all(c in "SL" for c in pattern), f"WINDOW_PATTERN must use only S and L, got {pattern!r}"
    long_w, short_w = config.sequence_len, config.sequence_len // 2
    sizes = [long_w if pattern[i % len(pattern)] == "L" else short_w for i in range(config.n_layer)]
    sizes[-1] = long_w
    return sizes


class Linear(nn.Module):
    """torch.nn.Linear(bias=False) layout (out, in). Weights stay fp32; the matmul runs in x's dtype."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = mx.zeros((out_features, in_features))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.astype(x.dtype)
        return x @ w.T


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = mx.zeros((num_embeddings, dim))

    def __call__(self, idx: mx.array) -> mx.array:
        return self.weight[idx]


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
        self.uses_ve = has_ve(layer_idx, config.n_layer)
        if self.uses_ve:
            self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head)

    def __call__(self, x: mx.array, ve: mx.array | None, window: int) -> mx.array:
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Value residual (ResFormer): input-dependent gate per kv head, 2*sigmoid(0) = 1 at init
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate[..., None] * ve.reshape(B, T, self.n_kv_head, self.head_dim)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        q, k = norm(rope(q)), norm(rope(k))
        y = attention(q, k, v, window)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(mx.square(nn.relu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, ve: mx.array | None, window: int) -> mx.array:
        x = x + self.attn(norm(x), ve, window)
        return x + self.mlp(norm(x))


class Transformer(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.h = [Block(config, i) for i in range(config.n_layer)]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.dtype = getattr(mx, COMPUTE_DTYPE)
        self.windows = window_sizes(config)
        self.transformer = Transformer(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.resid_lambdas = mx.ones((config.n_layer,))
        self.x0_lambdas = mx.zeros((config.n_layer,))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = {str(i): Embedding(config.vocab_size, kv_dim)
                             for i in range(config.n_layer) if has_ve(i, config.n_layer)}
        self.attention = prepare_attention(config.sequence_len, self.windows)  # the kernel's name

    def init_weights(self) -> None:
        """As upstream: N(0,1) embeddings, N(0,0.001) head, U(+-sqrt(3/d)) inputs, zero output projections."""
        c = self.config
        s = 3 ** 0.5 * c.n_embd ** -0.5
        t = self.transformer

        def uniform(w: mx.array) -> mx.array:
            return mx.random.uniform(-s, s, w.shape)

        t.wte.weight = mx.random.normal(t.wte.weight.shape)
        self.lm_head.weight = mx.random.normal(self.lm_head.weight.shape) * 0.001
        for block in t.h:
            block.attn.c_q.weight = uniform(block.attn.c_q.weight)
            block.attn.c_k.weight = uniform(block.attn.c_k.weight)
            block.attn.c_v.weight = uniform(block.attn.c_v.weight)
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)
            block.mlp.c_fc.weight = uniform(block.mlp.c_fc.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if block.attn.uses_ve:
                block.attn.ve_gate.weight = mx.zeros_like(block.attn.ve_gate.weight)
        self.resid_lambdas = mx.ones((c.n_layer,))
        self.x0_lambdas = mx.full((c.n_layer,), 0.1)
        for ve in self.value_embeds.values():
            ve.weight = uniform(ve.weight)

    def __call__(self, idx: mx.array) -> mx.array:
        """Token ids (B, T) -> float32 softcapped logits (B, T, V). The model never sees targets."""
        dt = self.dtype
        x = norm(self.transformer.wte(idx).astype(dt))
        x0 = x
        resid = self.resid_lambdas.astype(dt)  # scalars cast so the residual stream stays in dt
        x0_l = self.x0_lambdas.astype(dt)
        for i, block in enumerate(self.transformer.h):
            x = resid[i] * x + x0_l[i] * x0
            ve = self.value_embeds[str(i)](idx).astype(dt) if str(i) in self.value_embeds else None
            x = block(x, ve, self.windows[i])
        logits = self.lm_head(norm(x)).astype(mx.float32)
        return SOFTCAP * mx.tanh(logits / SOFTCAP)

    def num_scaling_params(self) -> dict[str, int]:
        def count(tree) -> int:
            return sum(v.size for _, v in tree_flatten(tree))
        counts = {
            "wte": count(self.transformer.wte.parameters()),
            "value_embeds": count({k: v.parameters() for k, v in self.value_embeds.items()}),
            "lm_head": count(self.lm_head.parameters()),
            "transformer_matrices": count([b.parameters() for b in self.transformer.h]),
            "scalars": self.resid_lambdas.size + self.x0_lambdas.size,
        }
        counts["total"] = sum(counts.values())
        return counts

    def estimate_flops(self) -> float:
        """FLOPs per token for forward + backward, as upstream: 6 x matmul params + attention."""
        c = self.config
        counts = self.num_scaling_params()
        matmul_params = counts["transformer_matrices"] + counts["lm_head"]
        q = c.n_embd // c.n_head
        attn = sum(12 * c.n_head * q * min(w, c.sequence_len) for w in self.windows)
        return 6 * matmul_params + attn


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy in nats, from fp32 logits."""
    target_logit = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.mean(mx.logsumexp(logits, axis=-1) - target_logit)


def training_loss(model: GPT, x: mx.array, y: mx.array) -> mx.array:
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


def adamw_step(p: mx.array, grad: mx.array, exp_avg: mx.array, exp_avg_sq: mx.array, step_t: mx.array,
               lr_t: mx.array, beta1_t: float, beta2_t: float, eps_t: float,
               wd_t: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """AdamW on one parameter: returns the new weight and both moments."""
    p = p * (1 - lr_t * wd_t)
    exp_avg = exp_avg + (1 - beta1_t) * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq + (1 - beta2_t) * (grad * grad - exp_avg_sq)
    denom = mx.sqrt(exp_avg_sq / (1 - beta2_t ** step_t)) + eps_t
    return p - (lr_t / (1 - beta1_t ** step_t)) * (exp_avg / denom), exp_avg, exp_avg_sq


def polar_express(X: mx.array, steps: int = NS_STEPS) -> mx.array:
    """Approximate orthogonalization of a stack of matrices (n, rows, cols), in float32."""
    X = X.astype(mx.float32)
    X = X / (mx.sqrt(mx.sum(X * X, axis=(-2, -1), keepdims=True)) * 1.02 + 1e-6)
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if tall:
            A = X.swapaxes(-1, -2) @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.swapaxes(-1, -2)
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def muon_step(stacked_grads: mx.array, stacked_params: mx.array, momentum_buffer: mx.array,
              second_momentum_buffer: mx.array, momentum_t: mx.array, lr_t: mx.array, wd_t: mx.array,
              beta2_t: float, red_dim: int) -> tuple[mx.array, mx.array, mx.array]:
    """Muon on a stack of same-shape matrices (n, rows, cols): returns new weights and both buffers."""
    # Nesterov momentum
    buf = momentum_buffer + (1 - momentum_t) * (stacked_grads - momentum_buffer)
    g = polar_express(stacked_grads + momentum_t * (buf - stacked_grads))
    # NorMuon: per-row (or per-column) second moment, renormalized to keep the update's norm
    v_mean = mx.mean(g * g, axis=red_dim, keepdims=True)
    red_size = g.shape[red_dim]
    v_norm = mx.sqrt(mx.sum(v_mean, axis=(-2, -1), keepdims=True) * red_size)
    second = second_momentum_buffer + (1 - beta2_t) * (v_mean - second_momentum_buffer)
    step_size = mx.rsqrt(mx.maximum(second, 1e-10))
    v_norm_new = mx.sqrt(mx.sum(v_mean * red_size * step_size * step_size, axis=(-2, -1), keepdims=True))
    g = g * (step_size * (v_norm / mx.maximum(v_norm_new, 1e-10)))
    # Cautious weight decay: decay only where the update and the weight agree in sign
    P = stacked_params
    P = P - lr_t * g - (lr_t * wd_t) * P * ((g * P) >= 0)
    return P, buf, second


class MuonAdamW:
    """
    Upstream's combined optimizer: Muon for 2-D block matrices (stacked per shape), AdamW for the rest,
    as pure array math so the update compiles into the step's graph. Param groups as torch.optim's
    (parameters named by path); `state` holds every array that changes (moments and the step count).
    The group values set_schedules changes per step reach the compiled update as one array,
    hyperparameters(), so changing them never recompiles the step.
    """

    def __init__(self, param_groups: list[dict], shapes: dict[str, tuple[int, ...]]):
        self.param_groups = param_groups
        self.state: dict = {"step": mx.array(0.0), "groups": [self._zeros(g, shapes) for g in param_groups]}
        mx.eval(self.state)

    @staticmethod
    def _zeros(group: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
        if group["kind"] == "muon":
            n, (rows, cols) = len(group["params"]), shapes[group["params"][0]]
            return {"momentum_buffer": mx.zeros((n, rows, cols)),
                    "second_momentum_buffer": mx.zeros((n, rows, 1) if rows >= cols else (n, 1, cols))}
        return {"exp_avg": [mx.zeros(shapes[p]) for p in group["params"]],
                "exp_avg_sq": [mx.zeros(shapes[p]) for p in group["params"]]}

    def hyperparameters(self) -> mx.array:
        """(groups, 3): each group's lr, Muon momentum and weight decay now."""
        return mx.array([[g["lr"], g.get("momentum", 0.0), g["weight_decay"]] for g in self.param_groups],
                        dtype=mx.float32)

    def apply(self, model: GPT, grads: dict, hyper: mx.array) -> None:
        """One update of every parameter from its gradient; hyper: hyperparameters() for this step."""
        params = dict(tree_flatten(model.trainable_parameters()))
        flat_g = dict(tree_flatten(grads))
        new: dict[str, mx.array] = {}
        step = self.state["step"] + 1
        self.state["step"] = step
        for i, (group, st) in enumerate(zip(self.param_groups, self.state["groups"])):
            lr, momentum, wd = hyper[i, 0], hyper[i, 1], hyper[i, 2]
            paths = group["params"]
            if group["kind"] == "muon":
                rows, cols = params[paths[0]].shape
                P, st["momentum_buffer"], st["second_momentum_buffer"] = muon_step(
                    mx.stack([flat_g[p] for p in paths]).astype(mx.float32), mx.stack([params[p] for p in paths]),
                    st["momentum_buffer"], st["second_momentum_buffer"], momentum,
                    lr * max(1.0, rows / cols) ** 0.5, wd, group["beta2"], -1 if rows >= cols else -2)
                new.update((path, P[j]) for j, path in enumerate(paths))
                continue
            for j, path in enumerate(paths):
                new[path], st["exp_avg"][j], st["exp_avg_sq"][j] = adamw_step(
                    params[path], flat_g[path].astype(mx.float32), st["exp_avg"][j], st["exp_avg_sq"][j], step,
                    lr, group["betas"][0], group["betas"][1], group["eps"], wd)
        model.update(tree_map_with_path(lambda path, p: new[path].astype(p.dtype), model.trainable_parameters()))


def build_optimizer(model: GPT) -> MuonAdamW:
    """The optimizer from this file's constants: AdamW groups as upstream, one Muon group per matrix shape."""
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5  # AdamW LRs were tuned at width 768
    print(f"Scaling AdamW LRs by 1/sqrt({model.config.n_embd}/768) = {dmodel_lr_scale:.6f}")

    def adamw(params: list, lr: float, betas: tuple[float, float] = ADAM_BETAS) -> dict:
        return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=ADAM_EPS, weight_decay=0.0)

    shapes = {path: tuple(p.shape) for path, p in tree_flatten(model.trainable_parameters())}
    matrices = [path for path in shapes if path.startswith("transformer.h.")]
    groups = [
        adamw(["lm_head.weight"], UNEMBEDDING_LR * dmodel_lr_scale),
        adamw(["transformer.wte.weight"], EMBEDDING_LR * dmodel_lr_scale),
        adamw([path for path in shapes if path.startswith("value_embeds.")], EMBEDDING_LR * dmodel_lr_scale),
        adamw(["resid_lambdas"], SCALAR_LR * 0.01),
        adamw(["x0_lambdas"], SCALAR_LR, betas=(0.96, 0.95)),
    ]
    for shape in sorted({shapes[p] for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if shapes[p] == shape], lr=MATRIX_LR,
                           momentum=0.95, beta2=MUON_BETA2, weight_decay=WEIGHT_DECAY))
    groups = [g for g in groups if g["params"]]
    assert sum(len(g["params"]) for g in groups) == len(shapes), "a parameter has no optimizer group"
    for group in groups:
        group["initial_lr"] = group["lr"]
    return MuonAdamW(groups, shapes)


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


def make_train_step(model: GPT, optimizer: MuonAdamW, grad_accum_steps: int,
                    compile: bool = False) -> Callable[[list[tuple[mx.array, mx.array]], float, int], mx.array]:
    """
    step(batches, progress, step) -> mean micro-batch loss (lazy). One optimizer step over
    `grad_accum_steps` (x, y) micro-batches, then the schedules and the Muon+AdamW update.
    With one micro-batch, forward, backward and update are a single compiled graph; with
    several, the forward/backward graph runs per micro-batch and the mean gradient feeds a
    compiled update.
    """
    loss_and_grad = nn.value_and_grad(model, lambda x, y: training_loss(model, x, y))
    maybe_compile = (lambda fn, state: partial(mx.compile, inputs=state, outputs=state)(fn)) if compile \
        else (lambda fn, state: fn)
    state = [model.state, optimizer.state]

    def grad_only(x: mx.array, y: mx.array):
        params = model.trainable_parameters()
        out = loss_and_grad(x, y)
        model.update(params)  # value_and_grad leaves its own (traced) copies of the parameters in the model
        return out

    def fused(x: mx.array, y: mx.array, hyper: mx.array) -> mx.array:
        loss, grads = grad_only(x, y)
        optimizer.apply(model, grads, hyper)
        return loss

    def update(grads: dict, hyper: mx.array) -> None:
        optimizer.apply(model, tree_map(lambda g: g * (1.0 / grad_accum_steps), grads), hyper)

    fused_c = maybe_compile(fused, state)
    grad_c = mx.compile(grad_only, inputs=[model.state]) if compile else grad_only
    update_c = maybe_compile(update, state)

    def step(batches: list[tuple[mx.array, mx.array]], progress: float, step: int) -> mx.array:
        assert len(batches) == grad_accum_steps, f"expected {grad_accum_steps} micro-batches, got {len(batches)}"
        set_schedules(optimizer, progress, step)
        hyper = optimizer.hyperparameters()  # an input, not a constant: new values never recompile the graph
        if grad_accum_steps == 1:
            loss = fused_c(*batches[0], hyper)
            mx.async_eval(loss, model.parameters(), optimizer.state)
            return loss
        total, acc = None, None
        for x, y in batches:
            loss, grads = grad_c(x, y)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            total = loss if total is None else total + loss
            mx.async_eval(total, acc)  # keep the device busy while the host queues the next micro-batch
        update_c(acc, hyper)
        total = total / grad_accum_steps
        mx.async_eval(total, model.parameters(), optimizer.state)
        return total

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
    mx.random.seed(seed)

    data = prepare.PreparedData.open()
    seq_len = data.profile.max_seq_len
    vocab_size = prepare.Tokenizer.from_directory(data.dir).get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")
    config = build_config(vocab_size, seq_len)
    print(f"Model config: {asdict(config)}")

    model = GPT(config)
    model.init_weights()
    mx.eval(model.parameters())
    print(f"Device: {ENGINE.hardware().device} ({mx.default_device()}), attention: {model.attention}, "
          f"compute dtype {COMPUTE_DTYPE}, compile: {COMPILE}")
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
    optimizer = build_optimizer(model)
    train_step = make_train_step(model, optimizer, grad_accum_steps, compile=COMPILE)

    loader = prepare.make_dataloader(DEVICE_BATCH_SIZE, seq_len, "train", seed=seed)
    budget = TimeBudget(prepare.TIME_BUDGET, warmup_steps=WARMUP_STEPS, sync=ENGINE.sync)
    print(f"Time budget: {budget.seconds:g}s (after {WARMUP_STEPS} warm-up steps)")
    print(f"Gradient accumulation steps: {grad_accum_steps}")

    log = StepLog()
    peak = ENGINE.peak_flops()
    epoch = 1
    while not budget.done:
        budget.start_step()
        batches = []
        for _ in range(grad_accum_steps):
            x, y, epoch = next(loader)
            batches.append((mx.array(x), mx.array(y)))
        loss = train_step(batches, budget.progress, budget.step)
        dt = budget.end_step()
        loss_f = loss.item()  # the device is idle here (end_step synced), so this read costs nothing
        fail_fast(loss_f, budget.step)
        log(budget, loss_f, TOTAL_BATCH_SIZE, dt, mfu_percent(flops_per_token, TOTAL_BATCH_SIZE, dt, peak), epoch,
            force=budget.done)
        if budget.step == 1:
            gc.collect()   # Python's GC causes long stalls; nothing cyclic is created per step
            gc.freeze()
            gc.disable()

    mx.clear_cache()
    forward = partial(mx.compile, inputs=model.state)(model.__call__) if COMPILE else model
    finish_run(ENGINE, model, forward, budget=budget, t_start=t_start, tokens_per_step=TOTAL_BATCH_SIZE,
               flops_per_token=flops_per_token, seed=seed, constants=globals(),
               extra={"grad_accum_steps": grad_accum_steps, "export_check_seconds": export_check_seconds,
                      "compute_dtype": str(model.dtype)})


if __name__ == "__main__":
    train()
