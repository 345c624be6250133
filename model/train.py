"""
The baseline the swarm evolves: a small modern GPT trained for a fixed time budget,
judged by validation bits per byte. One file; every knob is in the constants block.
The harness (prepare.py) owns the data, the budget and the metric.

    python -m model.prepare --source stdlib   # once
    python model/train.py
"""

import time

T_START = time.time()

import collections
import functools
import gc
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare

prepare.use_compile_cache()
# Bytecode of torch's sources, kept beside the compile cache, written there even under
# PYTHONDONTWRITEBYTECODE (site-packages stays untouched): where no usable .pyc files ship,
# a warm start then skips recompiling ~2000 modules (~5 s on the H100 machine).
sys.pycache_prefix = sys.pycache_prefix or os.path.join(prepare.cache_dir(), "pycache")
sys.dont_write_bytecode = False
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # FlashAttention 3 (Hopper), only if already installed; nothing is downloaded
    from flash_attn_interface import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

DEVICE = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"

# ---------------------------------------------------------------------------
# Constants: everything a researcher tunes lives here
# ---------------------------------------------------------------------------

if DEVICE == "cuda":  # H100-class GPU
    DEPTH = 8                  # transformer blocks
    MODEL_DIM = 512            # residual stream width
    DEVICE_BATCH_SIZE = 64     # rows per forward pass (lower it if memory runs out)
    TOTAL_BATCH_SIZE = 2**17   # tokens per optimizer step: small batches, many steps (bench/RESULTS.md)
else:  # CPU or Apple MPS: a model small enough to learn within a minute
    DEPTH = 4
    MODEL_DIM = 128
    DEVICE_BATCH_SIZE = 8
    TOTAL_BATCH_SIZE = 8 * 256
HEAD_DIM = 128 if DEVICE == "cuda" else 32  # per attention head
WINDOW_PATTERN = "SSSL"    # per layer: S = sliding window of SHORT_WINDOW tokens, L = full; the last layer is always L
SHORT_WINDOW = prepare.MAX_SEQ_LEN // 2
ROPE_BASE = 200_000
MLP_RATIO = 4              # hidden width of the ReLU^2 MLP
LOGIT_SOFTCAP = 15         # tanh cap on the output logits
UNTIMED_STEPS = 1 if DEVICE == "cuda" else 0  # the first step (compilation) does not count against the budget

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
    return F.rms_norm(x, (x.size(-1),))


def rotate(x, cos, sin):  # rotary position embedding on (B, T, H, D)
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def flex_block_mask(docs, window, block=128):
    """Causal, sliding-window, same-document attention as a flex BlockMask built
    from block-level document ranges (no (T, T) mask is ever materialized)."""
    B, T = docs.shape
    first, last = docs[:, ::block], docs[:, block - 1::block]  # doc ids at each block's ends
    n = torch.arange(T // block, device=docs.device)
    dist = n[:, None] - n[None, :]  # query block - key block
    some = (dist >= 0) & (dist * block - block + 1 < window) & (last[:, None, :] >= first[:, :, None])
    full = (dist > 0) & (dist * block + block - 1 < window) & (first[:, None, :] == last[:, :, None])
    partial = some & ~full

    def blocks(m):  # (B, q, kv) bool -> per q block: count, then the kv block indices in order
        # a scatter, not a sort: an argsort compiled into this graph gave wrong attention on the H100
        slot = torch.where(m, m.cumsum(-1) - 1, m.size(-1))  # absent blocks land in a spare slot
        idx = torch.zeros(*m.shape[:-1], m.size(-1) + 1, dtype=torch.int32, device=m.device)
        idx.scatter_(-1, slot, n.to(torch.int32).expand_as(m).contiguous())
        return m.sum(-1, dtype=torch.int32)[:, None], idx[..., :-1][:, None].contiguous()

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (q - kv < window) & (docs[b, q] == docs[b, kv])

    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block, mask_mod=mask_mod)


def attention(q, k, v, docs, window, masks):
    """Causal attention within each document and within `window` tokens; (B, T, H, D)."""
    B, T, H, D = q.shape
    if flash_attn_varlen_func is not None and q.is_cuda:
        starts = torch.ones_like(docs, dtype=torch.bool)
        starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
        cu = F.pad(starts.flatten().nonzero().flatten(), (0, 1), value=B * T).to(torch.int32)
        y = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, T, T,
                                   causal=True, window_size=(window - 1, 0))
        return (y[0] if isinstance(y, tuple) else y).view(B, T, H, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if isinstance(masks[window], BlockMask):
        y = flex_attention(q, k, v, block_mask=masks[window])
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[window][:, None])
    return y.transpose(1, 2)


def attention_masks(docs, windows):
    if flash_attn_varlen_func is not None and docs.is_cuda:
        return {}
    if docs.is_cuda and torch.compiler.is_compiling():  # flex is fast only when compiled
        return {w: flex_block_mask(docs, w) for w in windows}
    pos = torch.arange(docs.size(1), device=docs.device)
    dist = pos[:, None] - pos[None, :]
    same = docs[:, :, None] == docs[:, None, :]
    return {w: same & (dist >= 0) & (dist < w) for w in windows}


class CappedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of cap * tanh(x @ w.T / cap) against targets, for eager devices (CPU, MPS):
    the logits are made, used and dropped `rows` rows at a time, with their gradients, so no
    (tokens, vocab) tensor leaves the cache; eager PyTorch otherwise writes and reads all 64 MB
    of them about a dozen times a step (softcap, log-softmax and their backwards). Capped logits
    lie in [-cap, cap], so exp needs no max subtracted. The compiled CUDA path fuses on its own."""

    @staticmethod
    def forward(ctx, x, w, targets, cap, rows=256):
        n = x.size(0)
        loss, gx, gw, wc = x.new_zeros(()), torch.empty_like(x), torch.zeros_like(w), w / cap
        for i in range(0, n, rows):
            xc, yc = x[i:i + rows], targets[i:i + rows, None]
            t = torch.mm(xc, wc.t()).tanh_()
            e = torch.mul(t, cap).exp_()
            z = e.sum(1, keepdim=True)
            loss += (z.log() - cap * t.gather(1, yc)).sum()
            e.mul_(z.mul_(n).reciprocal_())                # softmax / n: the mean's gradient
            e.scatter_add_(1, yc, torch.full(yc.shape, -1 / n, dtype=e.dtype, device=e.device))
            e.addcmul_(e, t.mul_(t), value=-1)             # through the cap: times 1 - tanh^2
            gx[i:i + rows] = torch.mm(e, w)  # (rows x dim): small; no out= into a view (MPS)
            gw.addmm_(e.t(), xc)
        ctx.save_for_backward(gx, gw)
        return loss / n

    @staticmethod
    def backward(ctx, grad):
        gx, gw = ctx.saved_tensors
        return gx * grad, gw * grad, None, None, None


def capped_logits(h, w, cap, rows=256):
    """cap * tanh(h @ w.T / cap) in float32, (B, T, V), made `rows` rows at a time: eager PyTorch
    otherwise writes and reads the whole logits three times for the cap (a third of a CPU
    forward). In place: for evaluation only (no autograd). On a CPU the product goes straight
    into place, and the cap is taken as 2 cap sigmoid(2z) - cap, the same function: torch's CPU
    tanh took 4.2 ms a chunk, this 2.4 ms."""
    x, wc = h.reshape(-1, h.size(-1)), w / cap
    out = torch.empty(x.size(0), w.size(0), dtype=torch.float32, device=x.device)
    for i in range(0, x.size(0), rows):
        z = out[i:i + rows]
        if z.device.type == "cpu" and x.dtype == z.dtype:
            torch.mm(x[i:i + rows], wc.t(), out=z)
            z.mul_(2).sigmoid_().mul_(2 * cap).sub_(cap)
        else:  # MPS (which cannot make a product into a view) or another dtype
            z.copy_(torch.mm(x[i:i + rows], wc.t()).float().tanh_().mul_(cap))
    return out.view(*h.shape[:-1], w.size(0))


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

    def forward(self, x, ve, cos, sin, docs, window, masks):
        B, T, _ = x.shape
        h = norm(x)
        # one matrix product for q, k and v (Muon still sees three matrices)
        qkv = F.linear(h, torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight]))
        q, k, v = qkv.view(B, T, 3 * self.n_head, self.head_dim).split(self.n_head, dim=2)
        if ve is not None:  # value residual: token-dependent values mixed in per head
            v = v + 2 * torch.sigmoid(self.ve_gate(h[..., :32])).unsqueeze(-1) * ve.view_as(v)
        q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))
        y = attention(q, k, v, docs, window, masks)
        x = x + self.c_attn_proj(y.reshape(B, T, -1))
        return x + self.c_mlp_proj(F.relu(self.c_fc(norm(x))).square())


class GPT(nn.Module):
    def __init__(self, vocab_size, bos_id):
        super().__init__()
        n_head = MODEL_DIM // HEAD_DIM
        self.bos_id = bos_id
        self.value_layers = [i for i in range(DEPTH) if i % 2 == (DEPTH - 1) % 2]
        self.wte = nn.Embedding(vocab_size, MODEL_DIM)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab_size, MODEL_DIM) for i in self.value_layers})
        self.blocks = nn.ModuleList([Block(MODEL_DIM, n_head, i in self.value_layers) for i in range(DEPTH)])
        self.lm_head = nn.Linear(MODEL_DIM, vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(DEPTH))
        self.x0_lambdas = nn.Parameter(torch.full((DEPTH,), X0_LAMBDA_INIT))
        self.windows = [SHORT_WINDOW if WINDOW_PATTERN[i % len(WINDOW_PATTERN)] == "S" else SEQ_LEN for i in range(DEPTH)]
        self.windows[-1] = SEQ_LEN
        freq = 1.0 / ROPE_BASE ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
        angle = torch.outer(torch.arange(SEQ_LEN, dtype=torch.float32), freq)[None, :, None, :]
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        s = INIT_SCALE * (3 / MODEL_DIM) ** 0.5  # uniform bound with std INIT_SCALE/sqrt(dim)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.blocks:
            for lin in (block.c_q, block.c_k, block.c_v, block.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.c_attn_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.c_mlp_proj.weight)
            if block.ve_gate is not None:
                nn.init.zeros_(block.ve_gate.weight)
        if self.wte.weight.is_cuda:  # bf16 embeddings: a bf16 residual stream moves half the bytes
            self.wte.to(torch.bfloat16)
            self.value_embeds.to(torch.bfloat16)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        docs = torch.cumsum(idx == self.bos_id, dim=1)  # document number of each position
        masks = attention_masks(docs, set(self.windows))
        dtype = torch.bfloat16 if idx.is_cuda else torch.float32
        cos, sin = self.cos[:, :T].to(dtype), self.sin[:, :T].to(dtype)
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, docs, self.windows[i], masks)
        if targets is not None and not idx.is_cuda:  # eager: the loss without whole logits (CappedCrossEntropy)
            h = norm(x).view(-1, x.size(-1))
            return CappedCrossEntropy.apply(h, self.lm_head.weight, targets.reshape(-1), LOGIT_SOFTCAP)
        if targets is None and not idx.is_cuda and not torch.is_grad_enabled():  # eager evaluation: capped in cache
            return capped_logits(norm(x), self.lm_head.weight, LOGIT_SOFTCAP)
        logits = self.lm_head(norm(x)).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self):
        """autoresearch's estimate: 6 x (matrix params incl. lm_head) + 12 x heads x head_dim x window per layer."""
        embeds = self.wte.weight.numel() + sum(p.numel() for p in self.value_embeds.parameters())
        matrices = sum(p.numel() for p in self.parameters()) - embeds - 2 * DEPTH
        return 6 * matrices + sum(12 * MODEL_DIM * min(w, SEQ_LEN) for w in self.windows)


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


def muon_update(params, grads, momentum_buf, second_buf, lr, wd, momentum, beta2):
    """One step for a stack of same-shape matrices (n, rows, cols), in place."""
    momentum_buf.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buf, momentum)  # Nesterov
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for a, b, c in POLAR_EXPRESS:
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    if tall:
        x = x.mT
    # NorMuon: scale each neuron's update by its running RMS, keeping the overall norm
    dim = -1 if tall or x.size(-2) == x.size(-1) else -2
    sq = x.float().square().mean(dim=dim, keepdim=True)
    second_buf.lerp_(sq, 1 - beta2)
    scale = second_buf.clamp_min(1e-10).rsqrt()
    scale = scale * (sq.sum(dim=(-2, -1), keepdim=True) / (sq * scale.square()).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-20)).sqrt()
    update = x.float() * scale * max(1.0, grads.size(-2) / grads.size(-1)) ** 0.5
    decay = (update * params >= 0) * params  # cautious: decay only where the update agrees
    params.sub_(lr * (update + wd * decay))


def adamw_update(param, grad, exp_avg, exp_avg_sq, lr, wd, beta1, beta2, step, eps):
    """One AdamW step (decoupled weight decay, bias-corrected moments), in place, as torch.optim's."""
    param.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2 ** step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


class Optimizer:
    """What the loop needs of an optimizer: param_groups (dicts of settings and their params; the
    schedule sets each group's lr) and per-parameter state. Not torch.optim's: making one imports
    torch._dynamo, 1.2-1.4 s of every start on a CPU, where nothing else needs it."""

    def __init__(self, groups, defaults):
        self.param_groups = [dict(defaults, **g) for g in groups]
        self.state = collections.defaultdict(dict)


class AdamW(Optimizer):
    """torch.optim.AdamW's steps (tests/test_train_cpu.py checks them against it), for the CPU and MPS."""

    def __init__(self, groups, betas, eps, weight_decay=0.0):
        super().__init__(groups, dict(betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], group["lr"], group["weight_decay"],
                             *group["betas"], state["step"], group["eps"])


class Muon(Optimizer):
    def __init__(self, params, lr, momentum=0.95, beta2=0.95, weight_decay=0.0):
        shapes = sorted({p.shape for p in params})
        groups = [dict(params=[p for p in params if p.shape == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay))
        # 0-d tensors, so that changing values never recompiles the update
        self._hyper = {k: torch.tensor(0.0) for k in ("lr", "weight_decay", "momentum", "beta2")}
        self._update = torch.compile(muon_update, dynamic=False, fullgraph=True) if DEVICE == "cuda" else muon_update

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            ps = group["params"]
            state = self.state[ps[0]]
            if not state:
                n, rows, cols = len(ps), *ps[0].shape
                state["momentum"] = torch.zeros(n, rows, cols, device=ps[0].device)
                state["second"] = torch.zeros((n, rows, 1) if rows >= cols else (n, 1, cols), device=ps[0].device)
            for k, t in self._hyper.items():
                t.fill_(group[k])
            params = torch.stack(ps)
            self._update(params, torch.stack([p.grad for p in ps]), state["momentum"], state["second"],
                         *self._hyper.values())
            torch._foreach_copy_(ps, list(params.unbind(0)))


def make_optimizers(model):
    dim_scale = (MODEL_DIM / 768) ** -0.5  # Adam LRs were tuned at width 768
    wd = ADAM_WEIGHT_DECAY
    adam_groups = [
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * dim_scale, weight_decay=wd["lm_head"]),
        dict(params=[model.wte.weight], lr=EMBEDDING_LR * dim_scale, weight_decay=wd["embedding"]),
        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * dim_scale, weight_decay=wd["value_embedding"]),
        dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ]
    # torch's fused AdamW where CUDA compiles (and so imports torch._dynamo) anyway; this file's elsewhere
    adamw = functools.partial(torch.optim.AdamW, fused=True) if DEVICE == "cuda" else AdamW
    adam = adamw(adam_groups, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
    muon = Muon([p for p in model.blocks.parameters() if p.ndim == 2], lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return adam, muon


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

torch.manual_seed(42)
torch.set_float32_matmul_precision("high")
try:
    data = prepare.load_data()
except prepare.DataError as e:
    sys.exit(f"error: {e}")
model = GPT(data.vocab_size, data.bos_id).to(DEVICE)
model.init_weights()
adam, muon = make_optimizers(model)
num_params = sum(p.numel() for p in model.parameters())
flops_per_token = model.flops_per_token()
peak_flops = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}  # dense bf16
gpu_name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
peak = next((v for k, v in peak_flops.items() if k in gpu_name), None)
autocast = torch.autocast(device_type=DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda")
train_model = torch.compile(model, dynamic=False) if DEVICE == "cuda" else model
if TOTAL_BATCH_SIZE < SEQ_LEN:
    sys.exit(f"error: TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is less than one row of {SEQ_LEN} tokens")
rows = min(DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE // SEQ_LEN)  # a step smaller than a forward pass: fewer rows
grad_accum = max(1, TOTAL_BATCH_SIZE // (rows * SEQ_LEN))
batch_tokens = grad_accum * rows * SEQ_LEN
loader = prepare.TrainLoader(data, rows, SEQ_LEN, DEVICE)
print(f"device: {gpu_name} | profile: {prepare.PROFILE} | data: {data.fingerprint[:16]} | "
      f"params: {num_params / 1e6:.1f}M | batch: {batch_tokens:,} tokens | budget: {TIME_BUDGET:.0f}s", flush=True)

# ---------------------------------------------------------------------------
# Training: time-based schedules, stop when the budget is spent
# ---------------------------------------------------------------------------


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


x, y, epoch = next(loader)
step, train_seconds, smooth_loss, first_step_seconds, last_log = 0, 0.0, 0.0, None, 0.0
tty = sys.stdout.isatty()
while True:
    sync()
    t0 = time.time()
    progress = min(train_seconds / TIME_BUDGET, 1.0)
    cooldown = min(1.0, (1.0 - progress) / WARMDOWN_RATIO) if WARMDOWN_RATIO > 0 else 1.0
    lr_mult = cooldown + (1.0 - cooldown) * FINAL_LR_FRAC
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
    for group in muon.param_groups:
        group["momentum"] = 0.85 + 0.10 * min(step / MUON_MOMENTUM_WARMUP, 1.0)
        group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
    for _ in range(grad_accum):
        with autocast:
            loss = train_model(x, y)
        (loss / grad_accum).backward()
        x, y, epoch = next(loader)
    adam.step()
    muon.step()
    model.zero_grad(set_to_none=True)
    loss_value = loss.item()
    if not math.isfinite(loss_value) or loss_value > 100:
        print(f"\nFAIL: loss {loss_value} at step {step}")
        sys.exit(1)
    sync()
    dt = time.time() - t0
    if first_step_seconds is None:
        first_step_seconds = time.time() - T_START
        gc.collect()
        gc.freeze()  # Python's collector otherwise stalls the loop for ~0.5 s now and then
        gc.disable()
        loader.wait_seconds = 0.0  # from here on, any wait is the loader falling behind
    if step >= UNTIMED_STEPS:
        train_seconds += dt
    step += 1
    smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
    if tty or time.time() - last_log > 10:
        last_log = time.time()
        mfu = 100 * flops_per_token * batch_tokens / dt / peak if peak else 0.0
        print(f"{chr(13) if tty else ''}step {step:05d} ({100 * progress:.1f}%) | loss {smooth_loss / (1 - 0.9 ** step):.4f} | "
              f"dt {dt * 1000:.0f}ms | tok/s {batch_tokens / dt:,.0f} | mfu {mfu:.1f}% | epoch {epoch} | "
              f"remaining {max(0.0, TIME_BUDGET - train_seconds):.0f}s   ", end="" if tty else "\n", flush=True)
    if step > UNTIMED_STEPS and train_seconds >= TIME_BUDGET:
        break

if tty:
    print()
timed_steps = step - UNTIMED_STEPS
mfu = 100 * flops_per_token * batch_tokens * timed_steps / train_seconds / peak if peak and train_seconds else 0.0
del adam, muon  # free optimizer state before evaluation
model.eval()
t_eval = time.time()
with autocast:  # the harness evaluates (uncompiled: no extra compilation; attention: SDPA, dense mask)
    val_bpb = prepare.hand_over(model, DEVICE_BATCH_SIZE, DEVICE, data)
eval_seconds = time.time() - t_eval
peak_mb = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else 0.0

print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {train_seconds:.1f}")
print(f"total_seconds:    {time.time() - T_START:.1f}")
print(f"startup_seconds:  {first_step_seconds:.1f}")
print(f"eval_seconds:     {eval_seconds:.2f}")
print(f"peak_vram_mb:     {peak_mb:.1f}")
print(f"mfu_percent:      {mfu:.2f}")
print(f"total_tokens_M:   {step * batch_tokens / 1e6:.6f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {num_params / 1e6:.1f}")
print(f"depth:            {DEPTH}")
print(f"epochs:           {epoch}")
print(f"data_wait_s:      {loader.wait_seconds:.2f}")
