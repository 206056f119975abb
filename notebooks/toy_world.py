"""
toy_world.py -- a world of coloured shapes, how VAR is pretrained on it, and the reward models that judge it, all
from scratch on a CPU.

The official VAR was pretrained on ImageNet for days on many GPUs; nobody can watch that on a laptop. This file
builds a world small enough to pretrain in minutes on 2 CPU cores, with the very classes of var_grpo.py, so that
`python var_grpo.py --tiny` fine-tunes a model that really draws something, and a student sees GRPO change it.

  1. The world. 32 x 32 images, one shape of 10 classes (circle, square, ...) on a plain dark grey background; its
     position, size and colour vary at random. Drawn in code from a seed: no downloads, unlimited data. It comes in
     two sizes: the narrow world, 8 palette colours, which VAR is pretrained on; the broad world, 3 colours more
     (white, lime, brown), which the tokenizer and CLIP see. So CLIP knows colours that VAR never saw, as the real
     CLIP knows "ukiyo-e" and ImageNet barely contains it.
  2. The judge. A small CNN (var_grpo.ShapeJudge) that names the shape from its silhouette; it tells us whether a
     sample is of its class (class accuracy) without any human looking.
  3. Stage 1, the tokenizer: the multi-scale residual VQ-VAE (var_grpo.VQVAE), on the broad world. For k = 1..K
         r_k = argmin_v || area_down(f - f_hat, h_k) - e_v ||,   f_hat += phi_k(bicubic_up(e[r_k]))
     trained with   Loss = || x - Dec(f_st) ||^2 + (1/K) sum_k ( || f_hat_k - sg(f) ||^2 + 0.25 || sg(f_hat_k) - f ||^2 )
     where f_hat_k is f_hat after k scales (the codebook and phi terms pull it towards the encoder's f, the
     commitment term, weight 0.25, pulls f towards it) and f_st = f + sg(f_hat - f) is the straight-through
     estimator: the decoder sees the quantised latent, the encoder receives the decoder's gradient as if quantisation
     were the identity.
  4. Stage 2, the transformer: VAR (var_grpo.VAR) on the frozen tokenizer's token maps of the narrow world, teacher
     forced:   Loss = - (1/L) sum_t log p_theta(r_t | r_<scale(t), c),   c dropped to the null class with probability
     0.1. The dropout teaches the null-class distribution p(. | null) that classifier-free guidance subtracts.
  5. The reward models. A toy CLIP (an open_clip model of notebooks/toy/var-grpo-toy-clip.json), trained contrastively on broad
     images and captions made from their attributes ("a large white star on the left"); and a toy aesthetic head
     (var_grpo.AestheticHead, the LAION head's layers) on its image embeddings, trained to predict a rule: people
     like large shapes near the centre (aesthetic_rating).
  6. Export: plain state_dicts with the official key names, in fp16 (half the bytes), which var_grpo.py loads with
     strict=True for --tiny, and training.json with the command, seed, CPU minutes and quality. Every quality figure
     is measured on the exported weights as var_grpo.py loads them.

Run from the repository root:  python notebooks/toy_world.py --out notebooks/toy  (rebuilds the shipped weights;
without --out it writes into a new scratch directory, so that no run replaces them by accident; --quick: a smoke run)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import var_grpo as vg  # noqa: E402

CLIP_DIM = json.loads((vg.TOY_DIR / f"{vg.TOY_CLIP}.json").read_text())["embed_dim"]  # the toy CLIP's embeddings

TOY_DIR = vg.TOY_DIR  # notebooks/toy/, where --tiny looks for the weights


# ----------------------------------------------------------------------------------------------------------
# 1. The world: one shape per image. Every shape is a test on coordinates (u, v) measured from the shape's centre
# in units of its radius, so size and position are one affine map; antialiased by drawing at 4x and averaging.
# ----------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "plus", "cross", "frame", "bar", "star")
IMAGE_SIZE = 32


def inside(shape: str, u, v):
    """Boolean mask of the points (u, v) that lie in the shape of radius 1 centred at 0 (v points down)."""
    a, b, rho = u.abs(), v.abs(), (u * u + v * v).sqrt()
    if shape == "circle":
        return rho <= 1
    if shape == "square":
        return torch.maximum(a, b) <= 0.8
    if shape == "triangle":  # apex up, base at v = 0.8
        return (v <= 0.8) & (a <= (v + 1) / 1.8)
    if shape == "diamond":
        return a + b <= 1
    if shape == "ring":
        return (rho <= 1) & (rho >= 0.55)
    if shape == "plus":
        return ((a <= 0.3) & (b <= 1)) | ((b <= 0.3) & (a <= 1))
    if shape == "cross":  # the plus turned by 45 degrees
        return inside("plus", (u + v) / math.sqrt(2), (u - v) / math.sqrt(2))
    if shape == "frame":
        return (torch.maximum(a, b) <= 0.85) & (torch.maximum(a, b) >= 0.5)
    if shape == "bar":
        return (a <= 1) & (b <= 0.35)
    if shape == "star":  # five rounded points
        return rho <= 0.55 + 0.45 * torch.cos(5 * torch.atan2(u, -v))
    raise ValueError(shape)


# The narrow world, which VAR is pretrained on: the 8 colours of vg.TOY_PALETTE, equally likely, so a pretrained
# model draws one shape in eight red. The broad world, which the tokenizer and the toy CLIP see, adds colours
# outside that palette (white, lime, brown): what "ukiyo-e" is to ImageNet, a style the VAR's pretraining never
# showed it. The background is one fixed grey: with a random grey level, 900-step trials of this autoencoder
# (quantiser off) reached 17.8-19.0 dB PSNR, against 21.1 dB with the fixed background.
COLOURS, PALETTE = tuple(vg.TOY_COLOURS), vg.TOY_PALETTE
NEW_COLOURS = COLOURS[len(PALETTE):]
COLOURS_RGB = torch.tensor(list(vg.TOY_COLOURS.values()))
BACKGROUND = 0.25  # every colour differs from this grey by > 0.3 in some channel


def draw(label_B, generator: torch.Generator, colour_B=None, broad: bool = False, radius_B=None, centre_B2=None,
         size: int = IMAGE_SIZE, supersample: int = 4):
    """Images of the given classes, (B, 3, size, size) in [0, 1], and their true attributes. Random per image unless
    given: the radius (6..12 px), the centre (x, y; the shape stays 1 px off the border), and the colour: one of the 8
    of the palette, or with broad=True one of all COLOURS (colour_B: indices into COLOURS)."""
    B = len(label_B)
    radius = 6 + 6 * torch.rand(B, generator=generator)
    cx, cy = (radius + 1 + (size - 2 * radius - 2) * torch.rand(B, generator=generator) for _ in range(2))
    colour = torch.randint(len(COLOURS if broad else PALETTE), (B,), generator=generator)
    radius = radius if radius_B is None else radius_B
    cx, cy = (cx, cy) if centre_B2 is None else centre_B2.unbind(1)
    colour = colour if colour_B is None else colour_B
    n = size * supersample
    grid = (torch.arange(n) + 0.5) / supersample  # sub-pixel centres, in pixels
    u = (grid.view(1, 1, n) - cx.view(B, 1, 1)) / radius.view(B, 1, 1)
    v = (grid.view(1, n, 1) - cy.view(B, 1, 1)) / radius.view(B, 1, 1)
    mask_fine = torch.zeros(B, n, n)  # the shape at supersample x the resolution
    for c, shape in enumerate(SHAPES):
        rows = label_B == c
        if rows.any():
            mask_fine[rows] = inside(shape, u[rows].expand(-1, n, n), v[rows].expand(-1, n, n)).float()
    mask_B1HW = F.avg_pool2d(mask_fine.unsqueeze(1), supersample)
    images = BACKGROUND * (1 - mask_B1HW) + COLOURS_RGB[colour].view(B, 3, 1, 1) * mask_B1HW
    return images, dict(label=label_B, radius=radius, cx=cx, cy=cy, colour=colour, area=mask_B1HW.mean((1, 2, 3)))


def draw_batch(batch: int, generator: torch.Generator, broad: bool = False):
    """A batch of random classes and their images in [0, 1] (of the broad world with broad=True)."""
    label_B = torch.randint(len(SHAPES), (batch,), generator=generator)
    return label_B, draw(label_B, generator, broad=broad)[0]


# ----------------------------------------------------------------------------------------------------------
# 2. The judge: var_grpo.ShapeJudge, trained on drawn images. Pixel noise and a slight blur stand in for the
# imperfections of generated images, so that the judge reads the shape, not the exact rendering.
# ----------------------------------------------------------------------------------------------------------

def roughen(images_B3HW, generator: torch.Generator):
    """Random blur (a 3x3 box mixed in with weight 0..0.5) and pixel noise (std 0..0.04)."""
    B = len(images_B3HW)
    w = 0.5 * torch.rand(B, 1, 1, 1, generator=generator)
    blurred = F.avg_pool2d(F.pad(images_B3HW, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noise = 0.04 * torch.rand(B, 1, 1, 1, generator=generator) * torch.randn(images_B3HW.shape, generator=generator)
    return ((1 - w) * images_B3HW + w * blurred + noise).clamp(0, 1)


def train_judge(steps: int, generator: torch.Generator, batch: int = 64, log=print):
    """The trained judge and its loss at every step."""
    judge = vg.ShapeJudge(len(SHAPES))
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        label_B, images = draw_batch(batch, generator)
        loss = F.cross_entropy(judge(roughen(images, generator)), label_B)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"judge step {step:5d} | cross-entropy {loss.item():.4f}")
    return judge.eval().requires_grad_(False), losses


@torch.no_grad()
def accuracy(judge, images_B3HW, label_B) -> float:
    return (judge(images_B3HW).argmax(-1) == label_B).float().mean().item()


# ----------------------------------------------------------------------------------------------------------
# 3. Stage 1: the VQ-VAE. var_grpo's quantiser is the inference path; training needs f_hat with gradients to the
# codebook and phi, the VQ loss, and the straight-through estimator. Codes that no image used for a while are
# re-seeded with latent vectors of the current batch (a common remedy for dead codes at small scale; the official
# tokenizer is not known to need it).
# ----------------------------------------------------------------------------------------------------------

def quantize_for_training(quant: vg.MultiScaleQuantizer, f_BCvhw, commitment: float = 0.25):
    """f_st (straight-through f_hat), the VQ loss, and how often each code was chosen. (B, C, h, w), (), (V,)"""
    f_rest, f_hat = f_BCvhw.detach().clone(), torch.zeros_like(f_BCvhw)
    hits_V = torch.zeros(quant.embedding.num_embeddings)
    vq_loss = 0.0
    for si in range(len(quant.patch_nums)):
        idx_Bl = quant.nearest_tokens(f_rest, si)                    # argmin: no gradient
        e_BCvhw = quant.scale_contribution(si, idx_Bl)                # gradient to the codebook and phi_si
        f_hat = f_hat + e_BCvhw
        f_rest = f_rest - e_BCvhw.detach()
        hits_V += idx_Bl.flatten().bincount(minlength=len(hits_V))
        vq_loss = vq_loss + F.mse_loss(f_hat, f_BCvhw.detach()) + commitment * F.mse_loss(f_hat.detach(), f_BCvhw)
    return f_BCvhw + (f_hat - f_BCvhw).detach(), vq_loss / len(quant.patch_nums), hits_V


def train_vae(steps: int, generator: torch.Generator, batch: int = 8, lr: float = 2e-3, log=print):
    """The trained VQ-VAE and its reconstruction loss at every step."""
    vae = vg.build_vae(vg.TOY_ARCH).requires_grad_(True).train()  # built frozen for GRPO; trainable here
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    hits_V = torch.zeros(vg.TOY_ARCH["vocab_size"])
    losses = []
    for step in range(steps):
        for g in opt.param_groups:  # cosine decay to 0
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        _, images = draw_batch(batch, generator, broad=True)  # the tokenizer must express every colour CLIP knows
        x_B3HW = images * 2 - 1                                       # the VQ-VAE works in [-1, 1]
        f_BCvhw = vae.quant_conv(vae.encoder(x_B3HW))
        f_st, vq_loss, hits = quantize_for_training(vae.quantize, f_BCvhw)
        recon = vae.decoder(vae.post_quant_conv(f_st))
        rec_loss = F.mse_loss(recon, x_B3HW)
        opt.zero_grad(); (rec_loss + vq_loss).backward(); opt.step()
        losses.append(rec_loss.item())
        hits_V += hits
        if (step + 1) % 100 == 0 and step < 0.8 * steps:  # re-seed dead codes, not in the last 20% of training
            dead = (hits_V == 0).nonzero().squeeze(1)
            if len(dead):
                latent_cells = f_BCvhw.detach().permute(0, 2, 3, 1).reshape(-1, f_BCvhw.shape[1])
                pick = torch.randint(len(latent_cells), (len(dead),), generator=generator)
                vae.quantize.embedding.weight.data[dead] = latent_cells[pick]
            hits_V.zero_()
        if step % 500 == 0 or step == steps - 1:
            psnr = 10 * math.log10(4 / rec_loss.item())  # images span 2 in [-1, 1]
            log(f"vae step {step:5d} | recon mse {rec_loss.item():.5f} (PSNR {psnr:.1f} dB) | vq {vq_loss.item():.5f}")
    return vae.requires_grad_(False).eval(), losses


@torch.no_grad()
def psnr_db(vae: vg.VQVAE, images_B3HW) -> float:
    """PSNR of the VQ-VAE's reconstruction of images in [0, 1] (peak 1)."""
    recon = vae.tokens_to_img(vae.img_to_tokens(images_B3HW * 2 - 1)).add(1).div(2)
    return 10 * math.log10(1 / F.mse_loss(recon, images_B3HW).item())


# ----------------------------------------------------------------------------------------------------------
# 4. Stage 2: VAR, teacher forced on the frozen tokenizer's token maps, with class dropout for guidance.
# The initialisation follows the official init_weights in spirit: small residual branches and a small head, so
# that the untrained network starts near "predict the average token" and trains stably.
# ----------------------------------------------------------------------------------------------------------

def init_var(var: vg.VAR):
    std = math.sqrt(1 / var.C / 3)
    for m in var.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    var.head.weight.data.mul_(0.02)
    var.head_nm.ada_lin[-1].weight.data.mul_(0.5)
    for block in var.blocks:
        block.attn.proj.weight.data.div_(math.sqrt(2 * var.depth))
        block.ffn.fc2.weight.data.div_(math.sqrt(2 * var.depth))
        block.ada_lin[-1].weight.data[2 * var.C:].mul_(0.5)    # scales and shifts
        block.ada_lin[-1].weight.data[:2 * var.C].mul_(1e-5)   # gammas: residual branches start nearly closed
    return var


def train_var(vae: vg.VQVAE, steps: int, generator: torch.Generator, batch: int = 32, lr: float = 2e-3,
              class_dropout: float = 0.1, log=print, log_every: int = 500, on_log=None):
    """The trained VAR and its next-scale cross-entropy at every step. on_log(step, var), if given, is called
    at every log line (a notebook uses it to draw samples as they emerge)."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    var = init_var(vg.build_var(vg.TOY_ARCH, vg.TOY_DEPTH)).train()
    opt = torch.optim.AdamW(var.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup, losses = max(1, steps // 20), []
    for step in range(steps):
        for g in opt.param_groups:  # linear warm-up, then cosine decay to 0
            g["lr"] = lr * min(1, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        label_B, images = draw_batch(batch, generator)
        with torch.no_grad():
            tokens = vae.img_to_tokens(images * 2 - 1)
            f_BMCv = vae.quantize.tokens_to_var_input(tokens)
        dropped = torch.rand(batch, generator=generator) < class_dropout
        cond_B = torch.where(dropped, var.num_classes, label_B)     # the null class, as in sampling's CFG branch
        logits_BLV = var(cond_B, f_BMCv)
        loss = F.cross_entropy(logits_BLV.flatten(0, 1), torch.cat(tokens, 1).flatten())
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            log(f"var step {step:5d} | next-scale cross-entropy {loss.item():.4f} | lr {opt.param_groups[0]['lr']:.2e}")
            if on_log is not None:
                on_log(step, var.eval())
                var.train()
    return var.eval(), losses


@torch.no_grad()
def sample_accuracy(var, vae, judge, n: int, cfg: float, seed: int, batch: int = 256) -> float:
    """Class accuracy of n samples (classes 0..9 in turn) by the judge, with guidance cfg, no top-k/top-p."""
    labels, seeds = torch.arange(n) % var.num_classes, vg.image_seeds(n, seed, "accuracy")
    hits = [accuracy(judge, vg.sample(var, vae, labels[i:i + batch], seeds[i:i + batch], cfg).image, labels[i:i + batch])
            * len(labels[i:i + batch]) for i in range(0, n, batch)]
    return sum(hits) / n


def show(images_B3HW, titles=(), columns=None, size=2.2):
    """Images (B, 3, H, W) in [0, 1] in a matplotlib grid, size inches each: the one image grid all the notebooks
    use (matplotlib is a notebook-only extra)."""
    import matplotlib.pyplot as plt
    B = len(images_B3HW)
    columns = columns or B
    rows = -(-B // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images_B3HW, list(titles) + [""] * B):
        ax.imshow(img.detach().float().permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=9)
    plt.tight_layout()
    plt.show()


# ----------------------------------------------------------------------------------------------------------
# 5. The rewards' models: a toy CLIP and a toy aesthetic head, the two learned rewards of the paper in miniature.
# The toy CLIP is an open_clip model (notebooks/toy/var-grpo-toy-clip.json) trained contrastively on broad-world images and
# captions made from their attributes ("a large white star on the left"), so it knows colours the VAR never saw.
# The aesthetic head is var_grpo.AestheticHead (the LAION head's layers) on its image embeddings, trained to
# predict a rating from a stated rule: people like large shapes near the centre.
# ----------------------------------------------------------------------------------------------------------

SIZES = ("small", "medium", "large")                                          # radius < 8, 8..10, > 10 px
PLACES = ("in the centre", "on the left", "on the right", "at the top", "at the bottom")


def caption_attributes(attrs: dict) -> dict:
    """The words a caption may use, as class indices per image: shape, colour, size, place. {family: (B,)}"""
    dx, dy = attrs["cx"] - IMAGE_SIZE / 2, attrs["cy"] - IMAGE_SIZE / 2
    side = torch.where(dx.abs() >= dy.abs(), torch.where(dx < 0, 1, 2), torch.where(dy < 0, 3, 4))
    return dict(shape=attrs["label"], colour=attrs["colour"], size=torch.bucketize(attrs["radius"], torch.tensor([8.0, 10.0])),
                place=torch.where(torch.hypot(dx, dy) < 4, 0, side))


def captions(words: dict, generator: torch.Generator):
    """One caption per image naming a random subset of its attributes, e.g. "a white shape", "a large circle on the
    left"; and which images each caption is true of. (list of B strings, (B, B) bool: [i, j] = caption j fits image i)"""
    B = len(words["shape"])
    said = {f: torch.rand(B, generator=generator) < p for f, p in (("shape", 0.7), ("colour", 0.7), ("size", 0.4), ("place", 0.4))}
    fits_BB = torch.ones(B, B, dtype=torch.bool)
    for f, v in words.items():
        fits_BB &= ~said[f].view(1, B) | (v.view(B, 1) == v.view(1, B))
    texts = []
    for i in range(B):
        parts = ["a", SIZES[words["size"][i]] if said["size"][i] else "", COLOURS[words["colour"][i]] if said["colour"][i] else "",
                 SHAPES[words["shape"][i]] if said["shape"][i] else "shape", PLACES[words["place"][i]] if said["place"][i] else ""]
        texts.append(" ".join(filter(None, parts)))
    return texts, fits_BB


def aesthetic_rating(attrs: dict):
    """The toy world's taste, the rule the aesthetic head learns: 1 + 4.5 * size + 4.5 * centredness, in [1, 10], with
    size = (radius - 6) / 6 and centredness = 1 - (distance of the shape's centre from the image's) / 12. (B,)"""
    distance = torch.hypot(attrs["cx"] - IMAGE_SIZE / 2, attrs["cy"] - IMAGE_SIZE / 2)
    return 1 + 4.5 * (attrs["radius"] - 6) / 6 + 4.5 * (1 - distance / 12).clamp(0, 1)


def as_generated(images_B3HW, vae: vg.VQVAE, generator: torch.Generator):
    """What the rewards will see: three quarters of the images roughened (blur, noise), a quarter passed through the
    VQ-VAE, as every VAR sample is."""
    rough = roughen(images_B3HW, generator)
    cut = len(images_B3HW) * 3 // 4
    with torch.no_grad():
        rough[cut:] = vae.tokens_to_img(vae.img_to_tokens(images_B3HW[cut:] * 2 - 1)).add(1).div(2)
    return rough


def clip_image_embeddings(clip, images_B3HW):
    """L2-normalised image embeddings, through var_grpo's own preprocessing, as the reward computes them. (B, D)"""
    pp = clip.visual.preprocess_cfg
    return F.normalize(clip.encode_image(vg.clip_preprocess(images_B3HW, IMAGE_SIZE, pp["mean"], pp["std"])), dim=-1)


def new_clip():
    """A toy CLIP with random weights (open_clip would warn that no pretrained weights were loaded: that is the point)."""
    import logging, open_clip
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(vg.register_toy_clip())
    finally:
        logging.disable(logging.NOTSET)


def train_clip(vae: vg.VQVAE, steps: int, generator: torch.Generator, batch: int = 128, lr: float = 2e-3, log=print):
    """The toy CLIP, trained with the symmetric contrastive loss; a caption that fits several images of the batch
    ("a white shape") counts them all as positives, with equal weight."""
    import open_clip
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    clip, tokenizer = new_clip(), open_clip.get_tokenizer(vg.TOY_CLIP)
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)
    warmup, losses = max(1, steps // 20), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        label_B = torch.randint(len(SHAPES), (batch,), generator=generator)
        images, attrs = draw(label_B, generator, broad=True)
        texts, fits_BB = captions(caption_attributes(attrs), generator)
        img_BD = clip_image_embeddings(clip, as_generated(images, vae, generator))
        txt_BD = F.normalize(clip.encode_text(tokenizer(texts)), dim=-1)
        logits_BB = clip.logit_scale.exp() * img_BD @ txt_BD.T            # [i, j]: image i against caption j
        target = fits_BB.float()
        loss = (F.cross_entropy(logits_BB, target / target.sum(1, keepdim=True))
                + F.cross_entropy(logits_BB.T, (target / target.sum(0, keepdim=True)).T)) / 2
        opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"clip step {step:5d} | contrastive loss {loss.item():.4f} | temperature {clip.logit_scale.exp().item():.1f}")
    return clip.eval().requires_grad_(False), losses


@torch.no_grad()
def clip_accuracy(clip, images_B3HW, attrs: dict) -> dict:
    """Zero-shot accuracy of the toy CLIP: for each image, the prompt of highest cosine among "a circle", "a square",
    ... (shape); among "a red shape", ..., "a brown shape" (colour, all 11); and the colour on the images of a colour
    the VAR never saw (new_colour)."""
    import open_clip
    tokenizer = open_clip.get_tokenizer(vg.TOY_CLIP)
    img_BD = clip_image_embeddings(clip, images_B3HW)
    pick = lambda prompts: (img_BD @ F.normalize(clip.encode_text(tokenizer(prompts)), dim=-1).T).argmax(-1)
    shape_hit = pick([f"a {s}" for s in SHAPES]) == attrs["label"]
    colour_hit = pick([f"a {c} shape" for c in COLOURS]) == attrs["colour"]
    new = attrs["colour"] >= len(PALETTE)
    return dict(shape=shape_hit.float().mean().item(), colour=colour_hit.float().mean().item(),
                new_colour=colour_hit[new].float().mean().item())


def train_aesthetic(clip, vae: vg.VQVAE, steps: int, generator: torch.Generator, batch: int = 128, lr: float = 1e-3,
                    log=print):
    """The toy aesthetic head: AestheticHead on the frozen toy CLIP's image embeddings, regressed on the rating rule."""
    head = vg.AestheticHead(CLIP_DIM)
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        label_B = torch.randint(len(SHAPES), (batch,), generator=generator)
        images, attrs = draw(label_B, generator, broad=True)
        with torch.no_grad():
            emb_BD = clip_image_embeddings(clip, as_generated(images, vae, generator))
        loss = F.mse_loss(head(emb_BD), aesthetic_rating(attrs))
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"aesthetic step {step:5d} | mse {loss.item():.4f}")
    return head.eval().requires_grad_(False), losses


@torch.no_grad()
def aesthetic_correlation(clip, head, images_B3HW, attrs: dict) -> float:
    """Pearson correlation of the head's scores with the rule's ratings."""
    score_B, rating_B = head(clip_image_embeddings(clip, images_B3HW)), aesthetic_rating(attrs)
    return torch.corrcoef(torch.stack((score_B, rating_B)))[0, 1].item()


# ----------------------------------------------------------------------------------------------------------
# 6. Export, and the whole recipe
# ----------------------------------------------------------------------------------------------------------

def export(model: nn.Module, path: Path):
    """A plain fp16 state_dict with the official key names: what load_weights reads, half the bytes of fp32."""
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)


def reload(model: nn.Module, path: Path) -> nn.Module:
    """The exported weights as var_grpo loads them (fp16 rounded, then fp32): every figure is measured on these."""
    return vg.load_weights(model, path).eval().requires_grad_(False)


def write_toy_set(folder: Path) -> dict:
    """The list var_grpo.py checks a toy world's weights against (vg.TOY_SET): each file's sha256, and the set's id,
    the sha256 of those (so one set has one id, and a half-written or mixed folder is refused at load)."""
    files = {name: vg.file_sha256(folder / name) for name in WEIGHT_FILES}
    listed = dict(set=hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), files=files)
    (folder / vg.TOY_SET).write_text(json.dumps(listed, indent=1) + "\n")
    return listed


def put_in_place(staging: Path, out: Path):
    """Move a finished set from staging into out: the weights, training.json, then the list last, so that a run that
    reads out meanwhile finds files its list does not name and refuses them, rather than mixing two sets."""
    for name in (*WEIGHT_FILES, "training.json", vg.TOY_SET):
        os.replace(staging / name, out / name)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: a stage needs at least 1 step")
    return value


WEIGHT_FILES = ("judge.pth", "vae.pth", "var.pth", "clip.pth", "aesthetic.pth")


def output_dir(out: str) -> Path:
    """--out, else a new scratch directory: the shipped weights are replaced only when --out names their folder."""
    return Path(out) if out else Path(tempfile.mkdtemp(prefix="toy_world_"))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain the toy world's judge, VQ-VAE, VAR, CLIP and aesthetic head "
                                                 "from scratch.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-steps", type=positive, default=800)
    parser.add_argument("--vae-steps", type=positive, default=4000)
    parser.add_argument("--var-steps", type=positive, default=6000)
    parser.add_argument("--clip-steps", type=positive, default=800)
    parser.add_argument("--aesthetic-steps", type=positive, default=600)
    parser.add_argument("--out", default="", help=f"where the weights go; default: a new scratch directory. "
                                                  f"--out notebooks/toy replaces the shipped ones ({TOY_DIR})")
    parser.add_argument("--quick", action="store_true", help="a smoke run of 20 steps per stage")
    args = parser.parse_args(argv)
    if args.quick:
        args.judge_steps = args.vae_steps = args.var_steps = args.clip_steps = args.aesthetic_steps = 20
    out = output_dir(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".toy_world-", dir=out))  # the new set, until it is whole
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot write there ({e.strerror or e}); choose a directory you can write to")
    if out.resolve() == TOY_DIR.resolve():
        print(f"note: --out {out} replaces the toy weights the repository ships (`git checkout -- notebooks/toy` "
              f"restores them); they are replaced together at the end, and Ctrl-C before then changes nothing")
    print(f"writing the toy world's weights to {out}")
    try:
        record = build(args, staging, argv)
        put_in_place(staging, out)
    except KeyboardInterrupt:
        raise SystemExit(f"stopped by Ctrl-C; nothing in {out} was changed") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(json.dumps(record, indent=1))
    return record


def build(args, out: Path, argv) -> dict:
    """Every stage, in order, each exported into out and measured there; then training.json and the set's list."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    held_out = torch.Generator().manual_seed(10_000 + args.seed)  # images no stage ever trained on
    test_labels = torch.arange(1000) % len(SHAPES)
    test_images = draw(test_labels, held_out)[0]
    broad_images, broad_attrs = draw(test_labels, held_out, broad=True)
    times, report = {}, {}

    t0 = time.time()
    judge, _ = train_judge(args.judge_steps, gen)
    export(judge, out / "judge.pth")
    judge = reload(vg.ShapeJudge(len(SHAPES)), out / "judge.pth")
    times["judge"] = time.time() - t0
    report["judge_accuracy_drawn"] = accuracy(judge, test_images, test_labels)

    t0 = time.time()
    vae, _ = train_vae(args.vae_steps, gen)
    export(vae, out / "vae.pth")
    vae = reload(vg.build_vae(vg.TOY_ARCH), out / "vae.pth")
    times["vae"] = time.time() - t0
    with torch.no_grad():
        recon = vae.tokens_to_img(vae.img_to_tokens(test_images * 2 - 1)).add(1).div(2)
        broad_recon = vae.tokens_to_img(vae.img_to_tokens(broad_images * 2 - 1)).add(1).div(2)
    report["vae_psnr_db"] = psnr_db(vae, test_images)
    report["vae_psnr_db_broad"] = psnr_db(vae, broad_images)
    report["judge_accuracy_reconstructed"] = accuracy(judge, recon, test_labels)

    t0 = time.time()
    var, _ = train_var(vae, args.var_steps, gen)
    export(var, out / "var.pth")
    var = reload(vg.build_var(vg.TOY_ARCH, vg.TOY_DEPTH), out / "var.pth")
    times["var"] = time.time() - t0
    for cfg in (0.0, 1.5, 3.0):
        report[f"sample_accuracy_cfg{cfg}"] = sample_accuracy(var, vae, judge, 1000, cfg, seed=1)
    with torch.no_grad():
        colours = vg.toy_colour_of(vg.sample(var, vae, test_labels, vg.image_seeds(len(test_labels), 1, "colours"), 1.5).image)
    for name in NEW_COLOURS:  # it never saw them
        report[f"sample_share_{name}"] = (colours == COLOURS.index(name)).float().mean().item()

    t0 = time.time()
    clip, _ = train_clip(vae, args.clip_steps, gen)
    export(clip, out / "clip.pth")
    clip = reload(new_clip(), out / "clip.pth")
    times["clip"] = time.time() - t0
    for name, images in (("drawn", broad_images), ("reconstructed", broad_recon)):
        report.update({f"clip_accuracy_{k}_{name}": v for k, v in clip_accuracy(clip, images, broad_attrs).items()})

    t0 = time.time()
    head, _ = train_aesthetic(clip, vae, args.aesthetic_steps, gen)
    export(head, out / "aesthetic.pth")
    head = reload(vg.AestheticHead(CLIP_DIM), out / "aesthetic.pth")
    times["aesthetic"] = time.time() - t0
    report["aesthetic_correlation_drawn"] = aesthetic_correlation(clip, head, broad_images, broad_attrs)
    report["aesthetic_correlation_reconstructed"] = aesthetic_correlation(clip, head, broad_recon, broad_attrs)

    report = {k: round(v, 4) for k, v in report.items()}
    minutes = {k: round(v / 60, 2) for k, v in times.items()}
    command = "python notebooks/toy_world.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = dict(command=command.strip(), seed=args.seed, steps=dict(judge=args.judge_steps, vae=args.vae_steps,
                  var=args.var_steps, clip=args.clip_steps, aesthetic=args.aesthetic_steps), minutes=minutes,
                  torch=torch.__version__, open_clip=version("open_clip_torch"), threads=torch.get_num_threads(), **report)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    write_toy_set(out)
    return record


if __name__ == "__main__":
    main()
