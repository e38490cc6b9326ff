#!/usr/bin/env python3
"""Make the model fixtures of marlin-rs with the peer, marlin-pytorch.

Run in a throw-away venv outside the repository:
    python3 -m venv /opt/venv/peer && /opt/venv/peer/bin/pip install marlin-pytorch torch numpy safetensors
    /opt/venv/peer/bin/python tools/make_model_fixtures.py tests/fixtures/model

For each case: a tiny custom config (YAML, reference format), a peer model whose every parameter
(q_bias, v_bias, LayerNorms, position tables included) is perturbed with seeded noise, saved as
`.pt` (full and encoder-only), a Lightning-style `.ckpt` (state_dict + discriminator + optimizer
noise) and an HF-style prefixed safetensors; a random clip batch and visibility mask; and the
peer's outputs: extract_features (keep_seq true/false), forward (reconstruction) and the gradient
of the reconstruction MSE for a few parameters.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from einops import rearrange
from marlin_pytorch import Marlin
from safetensors.torch import save_file

CASES = [
    # name, seed, batch, init_values (layer scale), qkv_bias
    ("tiny_a", 1, 2, 0.0, True),
    ("tiny_b", 2, 1, 0.0, True),
    ("tiny_ls", 3, 1, 0.1, True),
    ("tiny_nobias", 4, 1, 0.0, False),
]
GRAD_KEYS = [
    "encoder.blocks.0.attn.q_bias",
    "encoder.blocks.1.norm2.weight",
    "encoder.norm.bias",
    "enc_dec_proj.weight",
    "decoder.mask_token",
    "decoder.head.bias",
]


def config(init_values, qkv_bias):
    return {
        "model_name": "tiny",
        "img_size": 32, "patch_size": 8, "clip_frames": 16, "tubelet_size": 2,
        "mask_strategy": "fasking", "temporal_sample_rate": 2, "mask_percentage_target": 0.9,
        "mlp_ratio": 4.0, "qkv_bias": qkv_bias, "qk_scale": None, "drop_rate": 0.0,
        "attn_drop_rate": 0.0, "norm_layer": "LayerNorm", "init_values": init_values,
        "adv_loss": True, "adv_weight": 0.01, "gp_weight": 0.0, "d_steps": 1, "g_steps": 1,
        "learning_rate": {"base": 1.5e-4, "warmup": 1.0e-6, "min": 1.0e-5, "warmup_epochs": 40},
        "optimizer": {"type": "AdamW", "eps": 1.0e-8, "betas": [0.9, 0.95]},
        "weight_decay": 0.0,
        "encoder": {"embed_dim": 32, "depth": 2, "num_heads": 4},
        "decoder": {"embed_dim": 16, "depth": 2, "num_heads": 2},
    }


def build(cfg):
    return Marlin(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], n_frames=cfg["clip_frames"],
        encoder_embed_dim=cfg["encoder"]["embed_dim"], encoder_depth=cfg["encoder"]["depth"],
        encoder_num_heads=cfg["encoder"]["num_heads"],
        decoder_embed_dim=cfg["decoder"]["embed_dim"], decoder_depth=cfg["decoder"]["depth"],
        decoder_num_heads=cfg["decoder"]["num_heads"], mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=cfg["qkv_bias"], qk_scale=cfg["qk_scale"], drop_rate=0.0, attn_drop_rate=0.0,
        norm_layer="LayerNorm", init_values=cfg["init_values"], tubelet_size=cfg["tubelet_size"],
        as_feature_extractor=False,
    )


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"peer": "marlin-pytorch 0.3.4", "torch": torch.__version__, "cases": {}}
    for name, seed, batch, init_values, qkv_bias in CASES:
        torch.manual_seed(seed)
        np.random.seed(seed)
        cfg = config(init_values, qkv_bias)
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        model = build(cfg).eval()
        with torch.no_grad():
            for k, p in model.state_dict().items():
                # Every parameter moves off its init, so a skipped or mis-mapped one shows.
                p.add_(0.2 * torch.randn_like(p))
                if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm.weight"):
                    p.add_(1.0)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        d_hidden = cfg["decoder"]["embed_dim"] * 4
        patch_dim = 3 * cfg["tubelet_size"] * cfg["patch_size"] ** 2
        disc = {
            "discriminator.layers.0.linear.weight": torch.randn(d_hidden, patch_dim) * 0.05,
            "discriminator.layers.0.linear.bias": torch.randn(d_hidden) * 0.05,
            "discriminator.layers.1.linear.weight": torch.randn(1, d_hidden) * 0.05,
            "discriminator.layers.1.linear.bias": torch.randn(1) * 0.05,
        }
        torch.save(sd, out / f"{name}.full.pt")
        if name == "tiny_a":  # the other file formats are checked on one case (fixture size)
            torch.save({k: v for k, v in sd.items() if k.startswith("encoder.")},
                       out / f"{name}.encoder.pt")
            torch.save({
                "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.6",
                "state_dict": {**sd, **disc},
                "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(4)}},
                                      "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]}],
                "lr_schedulers": [{"last_epoch": 3}],
                "hyper_parameters": {"model_name": "tiny", "lr": 1.5e-4},
            }, out / f"{name}.ckpt")
            save_file({f"marlin.{k}": v for k, v in sd.items()}, str(out / f"{name}.hf.safetensors"))

        n = (cfg["img_size"] // cfg["patch_size"]) ** 2 * cfg["clip_frames"] // cfg["tubelet_size"]
        n_vis = int(n * 0.1)
        clip = torch.rand(batch, 3, cfg["clip_frames"], cfg["img_size"], cfg["img_size"])
        mask = torch.zeros(batch, n, dtype=torch.bool)
        for b in range(batch):
            mask[b, torch.randperm(n)[:n_vis]] = True

        with torch.no_grad():
            seq = model.extract_features(clip, keep_seq=True)
            pooled = model.extract_features(clip, keep_seq=False)
        model.zero_grad()
        pred = model(clip, mask)
        target = rearrange(clip, "b c (t p0) (h p1) (w p2) -> b (t h w) (c p0 p1 p2)",
                           p0=cfg["tubelet_size"], p1=cfg["patch_size"], p2=cfg["patch_size"])
        target = target[~mask].view(batch, -1, patch_dim)
        loss = torch.nn.functional.mse_loss(pred, target)
        loss.backward()
        params = dict(model.named_parameters())
        grads = {k: params[k].grad for k in GRAD_KEYS if k in params}

        arrays = {
            "clip": clip, "mask": mask.to(torch.uint8), "features_seq": seq,
            "features_pooled": pooled, "forward": pred.detach(), "target": target,
            "loss": loss.detach().reshape(1),
            **{f"grad.{k}": g for k, g in grads.items()},
        }
        save_file({k: v.contiguous() for k, v in arrays.items()}, str(out / f"{name}.io.safetensors"))
        manifest["cases"][name] = {
            "seed": seed, "batch": batch, "init_values": init_values, "qkv_bias": qkv_bias,
            "num_patches": n, "num_visible": n_vis, "loss": float(loss),
            "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
        }
        print(name, "loss", float(loss), "seq", tuple(seq.shape), "pooled", tuple(pooled.shape),
              "forward", tuple(pred.shape))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/model"))
