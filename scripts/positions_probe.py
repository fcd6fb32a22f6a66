"""Issue 26's positions probe: does a small MDLM on real text learn word order from a learned
absolute position table? The `cpu` preset's data, tokenizer and loss, a bare training loop, the
position signal varied:

    learned  the absolute table added to the input (the paper's denoiser)
    none     no position signal at all (the table held at zero): a bag of words
    rope     rotary embeddings of queries and keys (model.positions=rope)

    python scripts/positions_probe.py VARIANT STEPS DEPTH WIDTH LR   # e.g. rope 1000 2 128 2e-3

Prints the held-out bound (nats/token; 256 held-out rows x 2 antithetic draws of t) every 100
steps. Warm-up 100 steps, then a constant learning rate; batch 64; seed 0.
"""

import sys
import time

import torch

from diladiff.config import build_config
from diladiff.data.batches import RowSampler
from diladiff.data.packing import prepare_data
from diladiff.data.tokenizer import load_tokenizer, require_mask_id, resolve_tokenizer
from diladiff.nets.token_denoiser import TokenDenoiser
from diladiff.pretrained import tokenizer_identity
from diladiff.processes.masking import elbo_weight, masked_diffusion_loss, sample_times

variant, steps, depth, width, lr = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5])
if variant not in ("learned", "none", "rope"):
    sys.exit(f"error: unknown variant {variant!r} (learned, none, rope)")
positions = "rope" if variant == "rope" else "learned"
overrides = [f"model.depth={depth}", f"model.width={width}", f"model.heads={width // 64}"]
cfg = build_config("cpu", [*overrides, f"model.positions={positions}"])
tok = load_tokenizer(resolve_tokenizer(cfg.data, progress=False))
tid = tokenizer_identity(tok)
mask_id = require_mask_id(tid, cfg.data.tokenizer, "positions probe")
data = prepare_data(cfg.data, tok, progress=False)

torch.manual_seed(0)
net = TokenDenoiser(cfg.model, tid["vocab_size"], cfg.data.seq_len)
if variant == "none":
    net.backbone.pos.data.zero_()
    net.backbone.pos.requires_grad_(False)
params = [p for p in net.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
rows, val = RowSampler(data.train, 0), torch.from_numpy(data.val[:256].astype("int64"))
g = torch.Generator().manual_seed(0)


def loss_of(x0, t, weight, gen):
    return masked_diffusion_loss(net.hidden, net.head, x0, t, weight, mask_id, gen)


@torch.no_grad()
def held_out_bound() -> float:
    gen, total = torch.Generator().manual_seed(1), 0.0
    for i in range(0, len(val), 64):
        x0 = val[i : i + 64].repeat(2, 1)
        t = sample_times(len(x0), gen, True, 1e-3)
        total += loss_of(x0, t, elbo_weight(t), gen).item()
    return total / (len(val) // 64)


start = time.time()
for step in range(1, steps + 1):
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, step / 100)
    x0 = rows.rows_at((step - 1) * 64, 64)
    t = sample_times(64, g, True, 1e-3)
    loss = loss_of(x0, t, torch.ones_like(t), g)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % 100 == 0:
        net.eval()
        print(f"{variant} step {step}: bound {held_out_bound():.3f} ({time.time() - start:.0f} s)")
        net.train()
