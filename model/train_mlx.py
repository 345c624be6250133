"""
The MLX baseline the swarm evolves on Apple Silicon: train.py's GPT (same architecture,
Muon + AdamW, time-based schedules) written with mlx, trained for a fixed time budget,
judged by validation bits per byte. One file; every knob is in the constants block.
The harness (prepare.py) owns the data, the budget and the metric.

    python -m model.prepare --source stdlib   # once
    python model/train_mlx.py
"""

import time

T_START = time.time()

import gc
import math
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

DEVICE = "gpu" if mx.default_device() == mx.gpu else "cpu"  # Apple GPU (Metal), or MLX on a CPU
if DEVICE == "cpu":
    mx.disable_compile()  # on a CPU, mx.compile builds C++ kernels: seconds of every short run

# ---------------------------------------------------------------------------
# Constants: everything a researcher tunes lives here
# ---------------------------------------------------------------------------

if DEVICE == "gpu":  # Apple Silicon: M-series GPU, unified memory
    DEPTH = 4                  # transformer blocks
    MODEL_DIM = 256            # residual stream width
    DEVICE_BATCH_SIZE = 16     # rows per forward pass (lower it if memory runs out)
    TOTAL_BATCH_SIZE = 2**15   # tokens per optimizer step
else:  # MLX on a CPU (Linux CI): its reference BLAS multiplies ~15x slower than torch, so a toy, many small steps
    DEPTH = 2
    MODEL_DIM = 64
    DEVICE_BATCH_SIZE = 2
    TOTAL_BATCH_SIZE = 2 * 256
HEAD_DIM = 64 if DEVICE == "gpu" else 32  # per attention head
WINDOW_PATTERN = "SSSL"    # per layer: S = sliding window of SHORT_WINDOW tokens, L = full; the last layer is always L
SHORT_WINDOW = prepare.MAX_SEQ_LEN // 2
ROPE_BASE = 200_000
MLP_RATIO = 4              # hidden width of the ReLU^2 MLP
LOGIT_SOFTCAP = 15         # tanh cap on the output logits
UNTIMED_STEPS = 1 if DEVICE == "gpu" else 0  # first steps (mx.compile traces the step) do not count against the budget

EMBEDDING_LR = 0.9         # Adam, token and value embeddings
UNEMBEDDING_LR = 0.005     # Adam, lm_head
SCALAR_LR = 0.5            # Adam, per-layer residual scalars
MATRIX_LR = 0.04           # Muon, every matrix inside the blocks
WEIGHT_DECAY = 0.15        # Muon's cautious weight decay, decayed to 0 with progress
ADAM_WEIGHT_DECAY = dict(embedding=0.001, value_embedding=0.003, lm_head=0.01)  # AdamW's, decoupled
INIT_SCALE = 0.68          # of the block matrices' uniform init (std 1/sqrt(dim) at 1)
X0_LAMBDA_INIT = 0.05      # per-layer weight of the first layer's input, mixed back into the stream
ADAM_BETAS = (0.8, 0.95)
WARMDOWN_RATIO = 0.75      # final fraction of the budget over which the LR falls linearly...
FINAL_LR_FRAC = 0.05       # ...to this fraction of its peak
MUON_MOMENTUM_WARMUP = 200 # steps over which Muon's momentum rises from 0.85 to 0.95

SEQ_LEN = prepare.MAX_SEQ_LEN
TIME_BUDGET = prepare.TIME_BUDGET

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def norm(x):
    return mx.fast.rms_norm(x, None, 1e-6)


def rotate(x, cos, sin):  # rotary position embedding on (B, T, H, D)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return mx.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def attention_masks(docs, windows):
    """Per window: (B, 1, T, T), True where a query may attend: causal, within the window, same document."""
    pos = mx.arange(docs.shape[1])
    dist = pos[:, None] - pos[None, :]
    same = docs[:, :, None] == docs[:, None, :]
    return {w: (same & (dist >= 0) & (dist < w))[:, None] for w in windows}


class Block(nn.Module):
    def __init__(self, dim, n_head, has_value_embed):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, dim, bias=False)
        self.c_v = nn.Linear(dim, dim, bias=False)
        self.c_attn_proj = nn.Linear(dim, dim, bias=False)
        self.c_fc = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.c_mlp_proj = nn.Linear(MLP_RATIO * dim, dim, bias=False)
        # value embedding gate: per head, from the first 32 channels (2*sigmoid(0) = 1 at init)
        self.ve_gate = nn.Linear(32, n_head, bias=False) if has_value_embed else None

    def __call__(self, x, ve, cos, sin, mask):
        B, T, _ = x.shape
        h = norm(x)
        # one matrix product for q, k and v (Muon still sees three matrices)
        qkv = h @ mx.concatenate([self.c_q.weight, self.c_k.weight, self.c_v.weight]).T
        q, k, v = mx.split(qkv.reshape(B, T, 3 * self.n_head, self.head_dim), 3, axis=2)
        if ve is not None:  # value residual: token-dependent values mixed in per head
            v = v + 2 * mx.sigmoid(self.ve_gate(h[..., :32]))[..., None] * ve.reshape(v.shape)
        q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, D)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        x = x + self.c_attn_proj(y.transpose(0, 2, 1, 3).reshape(B, T, -1))
        return x + self.c_mlp_proj(mx.square(nn.relu(self.c_fc(norm(x)))))


class GPT(nn.Module):
    def __init__(self, vocab_size, bos_id):
        super().__init__()
        n_head = MODEL_DIM // HEAD_DIM
        self.bos_id = bos_id
        value_layers = [i for i in range(DEPTH) if i % 2 == (DEPTH - 1) % 2]
        self.wte = nn.Embedding(vocab_size, MODEL_DIM)
        # keyed "layer<i>": keys of digits alone would turn into list indices in MLX's parameter trees
        self.value_embeds = {f"layer{i}": nn.Embedding(vocab_size, MODEL_DIM) for i in value_layers}
        self.blocks = [Block(MODEL_DIM, n_head, i in value_layers) for i in range(DEPTH)]
        self.lm_head = nn.Linear(MODEL_DIM, vocab_size, bias=False)
        self.resid_lambdas = mx.ones((DEPTH,))
        self.x0_lambdas = mx.full((DEPTH,), X0_LAMBDA_INIT)
        # names with a leading underscore are not parameters
        self._windows = [SHORT_WINDOW if WINDOW_PATTERN[i % len(WINDOW_PATTERN)] == "S" else SEQ_LEN for i in range(DEPTH)]
        self._windows[-1] = SEQ_LEN
        freq = 1.0 / ROPE_BASE ** (mx.arange(0, HEAD_DIM, 2, dtype=mx.float32) / HEAD_DIM)
        angle = mx.outer(mx.arange(SEQ_LEN, dtype=mx.float32), freq)[None, :, None, :]
        self._cos, self._sin = mx.cos(angle), mx.sin(angle)

    def init_weights(self):
        s = INIT_SCALE * (3 / MODEL_DIM) ** 0.5  # uniform bound with std INIT_SCALE/sqrt(dim)
        uniform = lambda w: mx.random.uniform(-s, s, w.shape)
        self.wte.weight = mx.random.normal(self.wte.weight.shape)
        self.lm_head.weight = 0.001 * mx.random.normal(self.lm_head.weight.shape)
        for ve in self.value_embeds.values():
            ve.weight = uniform(ve.weight)
        for block in self.blocks:
            for lin in (block.c_q, block.c_k, block.c_v, block.c_fc):
                lin.weight = uniform(lin.weight)
            block.c_attn_proj.weight = mx.zeros_like(block.c_attn_proj.weight)  # every block starts as the identity
            block.c_mlp_proj.weight = mx.zeros_like(block.c_mlp_proj.weight)
            if block.ve_gate is not None:
                block.ve_gate.weight = mx.zeros_like(block.ve_gate.weight)

    def __call__(self, idx):
        T = idx.shape[1]
        docs = mx.cumsum(idx == self.bos_id, axis=1)  # document number of each position
        masks = attention_masks(docs, set(self._windows))
        cos, sin = self._cos[:, :T], self._sin[:, :T]
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[f"layer{i}"](idx) if f"layer{i}" in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[self._windows[i]])
        logits = self.lm_head(norm(x))
        return LOGIT_SOFTCAP * mx.tanh(logits / LOGIT_SOFTCAP)

    def flops_per_token(self):
        """autoresearch's estimate: 6 x (matrix params incl. lm_head) + 12 x heads x head_dim x window per layer."""
        params = dict(tree_flatten(self.parameters()))
        embeds = sum(p.size for k, p in params.items() if k.startswith(("wte", "value_embeds")))
        matrices = sum(p.size for p in params.values()) - embeds - 2 * DEPTH
        return 6 * matrices + sum(12 * MODEL_DIM * min(w, SEQ_LEN) for w in self._windows)


# ---------------------------------------------------------------------------
# Optimizer: Muon for the matrices in the blocks, AdamW for the rest
# ---------------------------------------------------------------------------

# Polar Express coefficients (Amsel et al. 2025): 5 steps towards the orthogonal polar factor
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


class Muon(optim.Optimizer):
    """Nesterov momentum, orthogonalised by Newton-Schulz steps (Polar Express), each neuron's
    update scaled by its running RMS (NorMuon), cautious weight decay. The hyperparameters live
    in the state as arrays, so that changing them never retraces the compiled step."""

    def __init__(self, learning_rate, momentum=0.95, beta2=0.95, weight_decay=0.0):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self.set(momentum=momentum, beta2=beta2, weight_decay=weight_decay)

    def set(self, **values):
        for k, v in values.items():
            self.state[k] = mx.array(v, dtype=mx.float32)

    def init_single(self, parameter, state):
        rows, cols = parameter.shape
        state["momentum_buffer"] = mx.zeros_like(parameter)
        state["second_buffer"] = mx.zeros((rows, 1) if rows >= cols else (1, cols))

    def apply_single(self, grad, param, state):
        lr, wd, momentum, beta2 = (self.state[k] for k in ("learning_rate", "weight_decay", "momentum", "beta2"))
        buf = state["momentum_buffer"] = momentum * state["momentum_buffer"] + (1 - momentum) * grad
        x = (1 - momentum) * grad + momentum * buf  # Nesterov
        x = x / (mx.linalg.norm(x) * 1.02 + 1e-6)
        tall = x.shape[0] > x.shape[1]
        if tall:
            x = x.T
        for a, b, c in POLAR_EXPRESS:
            s = x @ x.T
            x = a * x + (b * s + c * (s @ s)) @ x
        if tall:
            x = x.T
        # NorMuon: scale each neuron's update by its running RMS, keeping the overall norm
        sq = mx.mean(mx.square(x), axis=-1 if x.shape[0] >= x.shape[1] else -2, keepdims=True)
        second = state["second_buffer"] = state["second_buffer"] + (1 - beta2) * (sq - state["second_buffer"])
        scale = mx.rsqrt(mx.maximum(second, 1e-10))
        scale = scale * mx.sqrt(mx.sum(sq) / mx.maximum(mx.sum(sq * mx.square(scale)), 1e-20))
        update = x * scale * max(1.0, grad.shape[0] / grad.shape[1]) ** 0.5
        decay = (update * param >= 0) * param  # cautious: decay only where the update agrees
        return param - lr * (update + wd * decay)


def make_optimizer(model):
    """AdamW groups as train.py's (by parameter name), Muon for everything in the blocks."""
    dim_scale = (MODEL_DIM / 768) ** -0.5  # Adam LRs were tuned at width 768
    wd = ADAM_WEIGHT_DECAY
    adam = lambda lr, decay=0.0, betas=ADAM_BETAS: optim.AdamW(lr, list(betas), eps=1e-10, weight_decay=decay,
                                                               bias_correction=True)
    groups = [
        ("lm_head", adam(UNEMBEDDING_LR * dim_scale, wd["lm_head"])),
        ("wte", adam(EMBEDDING_LR * dim_scale, wd["embedding"])),
        ("value_embeds", adam(EMBEDDING_LR * dim_scale, wd["value_embedding"])),
        ("resid_lambdas", adam(SCALAR_LR * 0.01)),
        ("x0_lambdas", adam(SCALAR_LR, betas=(0.96, 0.95))),
    ]
    muon = Muon(MATRIX_LR, weight_decay=WEIGHT_DECAY)
    filters = [lambda path, _, name=name: path.startswith(name + ".") or path == name for name, _ in groups]
    optimizer = optim.MultiOptimizer([opt for _, opt in groups] + [muon], filters)  # the last takes the rest
    return optimizer, muon


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

mx.random.seed(42)
try:
    data = prepare.load_data()
except prepare.DataError as e:
    sys.exit(f"error: {e}")
model = GPT(data.vocab_size, data.bos_id)
model.init_weights()
optimizer, muon = make_optimizer(model)
optimizer.init(model.trainable_parameters())
peak_lrs = [opt.learning_rate.item() for opt in optimizer.optimizers]
mx.eval(model.parameters(), optimizer.state)
num_params = sum(p.size for _, p in tree_flatten(model.parameters()))
flops_per_token = model.flops_per_token()
if TOTAL_BATCH_SIZE < SEQ_LEN:
    sys.exit(f"error: TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is less than one row of {SEQ_LEN} tokens")
rows = min(DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE // SEQ_LEN)  # a step smaller than a forward pass: fewer rows
grad_accum = max(1, TOTAL_BATCH_SIZE // (rows * SEQ_LEN))
batch_tokens = grad_accum * rows * SEQ_LEN
loader = prepare.TrainLoader(data, rows, SEQ_LEN, None)  # numpy int32 batches
print(f"device: mlx {mx.__version__} on the {DEVICE} | profile: {prepare.PROFILE} | data: {data.fingerprint[:16]} | "
      f"params: {num_params / 1e6:.1f}M | batch: {batch_tokens:,} tokens | budget: {TIME_BUDGET:.0f}s", flush=True)

loss_and_grad = nn.value_and_grad(model, lambda x, y: nn.losses.cross_entropy(model(x), y, reduction="mean"))
state = [model.state, optimizer.state]


@partial(mx.compile, inputs=state, outputs=state)
def micro_step(x, y):
    return loss_and_grad(x, y)


@partial(mx.compile, inputs=state, outputs=state)
def update(grads):
    optimizer.update(model, grads)


# ---------------------------------------------------------------------------
# Training: time-based schedules, stop when the budget is spent
# ---------------------------------------------------------------------------

x, y, epoch = next(loader)
step, train_seconds, smooth_loss, first_step_seconds, last_log = 0, 0.0, 0.0, None, 0.0
tty = sys.stdout.isatty()
while True:
    t0 = time.time()
    progress = min(train_seconds / TIME_BUDGET, 1.0)
    cooldown = min(1.0, (1.0 - progress) / WARMDOWN_RATIO) if WARMDOWN_RATIO > 0 else 1.0
    lr_mult = cooldown + (1.0 - cooldown) * FINAL_LR_FRAC
    for opt, lr in zip(optimizer.optimizers, peak_lrs):
        opt.learning_rate = lr * lr_mult
    muon.set(momentum=0.85 + 0.10 * min(step / MUON_MOMENTUM_WARMUP, 1.0), weight_decay=WEIGHT_DECAY * (1 - progress))
    grads = None
    for _ in range(grad_accum):
        loss, g = micro_step(mx.array(x), mx.array(y))
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(loss, grads)  # one micro-batch's activations at a time
        x, y, epoch = next(loader)
    update(tree_map(lambda g: g / grad_accum, grads) if grad_accum > 1 else grads)
    mx.eval(model.parameters(), optimizer.state)
    loss_value = loss.item()
    if not math.isfinite(loss_value) or loss_value > 100:
        print(f"\nFAIL: loss {loss_value} at step {step}")
        sys.exit(1)
    dt = time.time() - t0
    if first_step_seconds is None:
        first_step_seconds = time.time() - T_START
        gc.collect()
        gc.freeze()  # Python's collector otherwise stalls the loop now and then
        gc.disable()
        loader.wait_seconds = 0.0  # from here on, any wait is the loader falling behind
    if step >= UNTIMED_STEPS:
        train_seconds += dt
    step += 1
    smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
    if tty or time.time() - last_log > 10:
        last_log = time.time()
        print(f"{chr(13) if tty else ''}step {step:05d} ({100 * progress:.1f}%) | loss {smooth_loss / (1 - 0.9 ** step):.4f} | "
              f"dt {dt * 1000:.0f}ms | tok/s {batch_tokens / dt:,.0f} | epoch {epoch} | "
              f"remaining {max(0.0, TIME_BUDGET - train_seconds):.0f}s   ", end="" if tty else "\n", flush=True)
    if step > UNTIMED_STEPS and train_seconds >= TIME_BUDGET:
        break

if tty:
    print()
t_eval = time.time()
val_bpb = prepare.hand_over_mlx(model, DEVICE_BATCH_SIZE, data)  # the harness evaluates
eval_seconds = time.time() - t_eval

print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {train_seconds:.1f}")
print(f"total_seconds:    {time.time() - T_START:.1f}")
print(f"startup_seconds:  {first_step_seconds:.1f}")
print(f"eval_seconds:     {eval_seconds:.1f}")
print(f"peak_vram_mb:     {mx.get_peak_memory() / 2**20:.1f}")
print("mfu_percent:      0.00")  # no table of Apple peak FLOPs
print(f"total_tokens_M:   {step * batch_tokens / 1e6:.6f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {num_params / 1e6:.1f}")
print(f"depth:            {DEPTH}")
print(f"epochs:           {epoch}")
print(f"data_wait_s:      {loader.wait_seconds:.2f}")
