#!/usr/bin/env python3
"""Pretraining-step fixture: one discriminator step then one generator step, as the notes
describe the reference's training_step, in PyTorch with marlin-pytorch's encoder/decoder, from
the tiny_a weights (tests/fixtures/model/tiny_a.ckpt: model + discriminator), batch and mask
(tiny_a.io.safetensors), for tests/suite/pretrain_step.rs.

    /opt/venv/peer/bin/python tools/make_train_fixtures.py

Step (d_steps = g_steps = 1, gp_weight 0): AdamW(betas (0.9, 0.95), eps 1e-8, weight_decay
0.05, lr 1.5e-4, the reference base rate) for each of the two parameter sets. A first Adam
step moves each weight by about lr * sign(grad), so a weight whose gradient is ~1e-8 moves by an
amount that float rounding decides: with lr 1e-3 one such weight differed by 1.5e-4.
  D: pred = model(clip, mask); loss_d = mean(D(pred)) - mean(D(real masked patches)).
  G: pred = model(clip, mask); rec = MSE(pred, real); adv = 0.01 * -mean(D(pred)) with the
     updated D; loss_g = rec + adv.
Saved (tests/fixtures/train/step.safetensors): the losses, every parameter after the step, and
the gradient of the reconstruction MSE (at the initial weights) for every generator parameter.
"""
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file

import importlib.util
import sys

root = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("mf", root / "tools/make_model_fixtures.py")
mf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mf)

cfg = mf.config(0.0, True)
model = mf.build(cfg)
ckpt = torch.load(root / "tests/fixtures/model/tiny_a.ckpt", weights_only=False)["state_dict"]
model.load_state_dict({k: v for k, v in ckpt.items() if not k.startswith("discriminator.")})
patch_dim = 3 * cfg["tubelet_size"] * cfg["patch_size"] ** 2
hidden = cfg["decoder"]["embed_dim"] * 4
disc = torch.nn.Sequential(torch.nn.Linear(patch_dim, hidden), torch.nn.LeakyReLU(0.01), torch.nn.Linear(hidden, 1))
disc[0].weight.data = ckpt["discriminator.layers.0.linear.weight"].clone()
disc[0].bias.data = ckpt["discriminator.layers.0.linear.bias"].clone()
disc[2].weight.data = ckpt["discriminator.layers.1.linear.weight"].clone()
disc[2].bias.data = ckpt["discriminator.layers.1.linear.bias"].clone()

io = load_file(str(root / "tests/fixtures/model/tiny_a.io.safetensors"))
clip, mask = io["clip"], io["mask"].bool()
b = clip.shape[0]
model.train()

kw = dict(lr=1.5e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
opt_g = torch.optim.AdamW(list(model.encoder.parameters()) + list(model.decoder.parameters())
                          + list(model.enc_dec_proj.parameters()), **kw)
opt_d = torch.optim.AdamW(disc.parameters(), **kw)

real = rearrange(clip, "b c (t p0) (h p1) (w p2) -> b (t h w) (c p0 p1 p2)",
                 p0=cfg["tubelet_size"], p1=cfg["patch_size"], p2=cfg["patch_size"])
real = real[~mask].view(b, -1, patch_dim)

# Gradients of the reconstruction loss at the initial weights, for every generator parameter:
# an Adam step is ~lr * sign(grad), blind to a gradient's size, so the sizes are checked here.
model.zero_grad()
torch.nn.functional.mse_loss(model(clip, mask), real).backward()
grads = {f"grad.{k}": p.grad.detach().clone().contiguous() for k, p in model.named_parameters()
         if p.grad is not None}
model.zero_grad()

opt_d.zero_grad()
pred = model(clip, mask)
loss_d = disc(pred).mean() - disc(real).mean()
loss_d.backward()
opt_d.step()

opt_g.zero_grad()
pred = model(clip, mask)
rec = torch.nn.functional.mse_loss(pred, real)
adv = 0.01 * -disc(pred).mean()
loss_g = rec + adv
loss_g.backward()
opt_g.step()

after = {k: v.detach().clone() for k, v in model.state_dict().items()}
after["discriminator.layers.0.linear.weight"] = disc[0].weight.detach().clone()
after["discriminator.layers.0.linear.bias"] = disc[0].bias.detach().clone()
after["discriminator.layers.1.linear.weight"] = disc[2].weight.detach().clone()
after["discriminator.layers.1.linear.bias"] = disc[2].bias.detach().clone()
out = {f"after.{k}": v.contiguous() for k, v in after.items()}
out.update(grads)
for k, v in (("loss_d", loss_d), ("rec", rec), ("adv", adv), ("loss_g", loss_g)):
    out[k] = v.detach().reshape(1)
save_file(out, str(root / "tests/fixtures/train/step.safetensors"))
print({k: float(out[k]) for k in ("loss_d", "rec", "adv", "loss_g")})

# ---- The same step with the gradient penalty (gp_weight 10), the reference's definition: one
# uniform draw a per critic step, x = a * real + (1 - a) * fake, the penalty
# mean over patches of (|dD/dx| - 1)^2, by double backpropagation (create_graph=True).
# a is marlin-rs's gp_alpha(seed 12345, step 0) (splitmix64, reproduced below) so the Rust test
# draws the same. Saved (tests/fixtures/train/step_gp.safetensors): gp, the critic loss with
# the penalty, its gradient for the 4 critic weights at the initial weights, and every
# parameter after the whole step (critic then generator).
M = (1 << 64) - 1


def gp_alpha(seed, j):
    z = (seed + (j + 1) * 0x9E3779B97F4A7C15) & M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    z ^= z >> 31
    return (z >> 40) / float(1 << 24)


alpha = gp_alpha(12345, 0)
model.load_state_dict({k: v for k, v in ckpt.items() if not k.startswith("discriminator.")})
disc[0].weight.data = ckpt["discriminator.layers.0.linear.weight"].clone()
disc[0].bias.data = ckpt["discriminator.layers.0.linear.bias"].clone()
disc[2].weight.data = ckpt["discriminator.layers.1.linear.weight"].clone()
disc[2].bias.data = ckpt["discriminator.layers.1.linear.bias"].clone()
opt_g = torch.optim.AdamW(list(model.encoder.parameters()) + list(model.decoder.parameters())
                          + list(model.enc_dec_proj.parameters()), **kw)
opt_d = torch.optim.AdamW(disc.parameters(), **kw)

opt_d.zero_grad()
pred = model(clip, mask).detach()
interp = (alpha * real + (1 - alpha) * pred).requires_grad_(True)
d_interp = disc(interp)
g, = torch.autograd.grad(d_interp, interp, torch.ones_like(d_interp), create_graph=True)
gp = ((g.reshape(-1, patch_dim).norm(2, dim=1) - 1) ** 2).mean()
loss_d = disc(pred).mean() - disc(real).mean() + 10.0 * gp
loss_d.backward()
names = ["discriminator.layers.0.linear.weight", "discriminator.layers.0.linear.bias",
         "discriminator.layers.1.linear.weight", "discriminator.layers.1.linear.bias"]
gout = {"alpha": torch.tensor([alpha]), "gp": gp.detach().reshape(1),
        "loss_d": loss_d.detach().reshape(1)}
for name, p in zip(names, [disc[0].weight, disc[0].bias, disc[2].weight, disc[2].bias]):
    gout[f"grad.{name}"] = p.grad.detach().clone().contiguous()
opt_d.step()

opt_g.zero_grad()
pred = model(clip, mask)
rec = torch.nn.functional.mse_loss(pred, real)
loss_g = rec + 0.01 * -disc(pred).mean()
loss_g.backward()
opt_g.step()
after = {k: v.detach().clone() for k, v in model.state_dict().items()}
for name, p in zip(names, [disc[0].weight, disc[0].bias, disc[2].weight, disc[2].bias]):
    after[name] = p.detach().clone()
gout.update({f"after.{k}": v.contiguous() for k, v in after.items()})
gout["loss_g"] = loss_g.detach().reshape(1)
save_file(gout, str(root / "tests/fixtures/train/step_gp.safetensors"))
print({"alpha": alpha, "gp": float(gp), "loss_d": float(loss_d), "loss_g": float(loss_g)})
