"""
toy_world.py -- a world of coloured shapes, and how VAR is pretrained on it, from scratch, on a CPU.

The official VAR was pretrained on ImageNet for days on many GPUs; nobody can watch that on a laptop. This file
builds a world small enough to pretrain in minutes on 2 CPU cores, with the very classes of var_grpo.py, so that
`python var_grpo.py --tiny` fine-tunes a model that really draws something, and a student sees GRPO change it.

  1. The world. 32 x 32 images, one shape of 10 classes (circle, square, ...) on a plain dark grey background; its
     position, size and colour (one of 8) vary at random. Drawn in code from a seed: no downloads, unlimited data.
  2. The judge. A small CNN (var_grpo.ShapeJudge) that names the shape from its silhouette; it tells us whether a
     sample is of its class (class accuracy) without any human looking.
  3. Stage 1, the tokenizer: the multi-scale residual VQ-VAE (var_grpo.VQVAE). For k = 1..K
         r_k = argmin_v || area_down(f - f_hat, h_k) - e_v ||,   f_hat += phi_k(bicubic_up(e[r_k]))
     trained with   L = || x - D(f_st) ||^2 + (1/K) sum_k ( || f_hat_k - sg(f) ||^2 + beta || sg(f_hat_k) - f ||^2 )
     where f_hat_k is f_hat after k scales (the codebook and phi terms pull it towards the encoder's f, the
     commitment term pulls f towards it) and f_st = f + sg(f_hat - f) is the straight-through estimator: the decoder
     sees the quantised latent, the encoder receives the decoder's gradient as if quantisation were the identity.
  4. Stage 2, the transformer: VAR (var_grpo.VAR) on the frozen tokenizer's token maps, teacher forced:
         L = - (1/L) sum_t log p_theta(r_t | r_<scale(t), c),   c dropped to the null class with probability 0.1
     The dropout teaches the null-class distribution p(. | null) that classifier-free guidance subtracts.
  5. Export: plain state_dicts with the official key names, in fp16 (half the bytes), which var_grpo.py loads with
     strict=True for --tiny, and training.json with the command, seed, CPU minutes and quality. Every quality figure
     is measured on the exported weights as var_grpo.py loads them.

Run from the repository root:  python notebooks/toy_world.py  (rebuilds notebooks/toy/; --quick: a smoke run)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import var_grpo as vg  # noqa: E402

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


def hsv_to_rgb(h_B, s_B, v_B):
    """Colour from hue, saturation, value in [0, 1]. (B, 3)"""
    k_B3 = (torch.tensor([5.0, 3.0, 1.0]) + h_B[:, None] * 6) % 6
    return v_B[:, None] - (v_B * s_B)[:, None] * torch.minimum(k_B3, 4 - k_B3).clamp(0, 1)


# red, orange, yellow, green, cyan, blue, purple, pink: hues of saturation 0.85 and value 0.9, equally likely, so a
# pretrained model draws one shape in eight red. The background is one fixed grey: with a random grey level, 900-step
# trials of this autoencoder (quantiser off) reached 17.8-19.0 dB PSNR, against 21.1 dB with the fixed background.
PALETTE = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
PALETTE_RGB = hsv_to_rgb(torch.tensor([0, 1 / 12, 1 / 6, 1 / 3, 1 / 2, 2 / 3, 3 / 4, 5 / 6]), torch.full((8,), 0.85),
                         torch.full((8,), 0.9))
BACKGROUND = 0.25  # every palette colour differs from this grey by > 0.4 in some channel


def draw(label_B, generator: torch.Generator, colour_B=None, size: int = IMAGE_SIZE, supersample: int = 4):
    """Images of the given classes, (B, 3, size, size) in [0, 1], and their true attributes. Random per image:
    radius 6..12 px, a centre that keeps the shape 1 px off the border, one of the 8 palette colours (unless
    colour_B gives their indices)."""
    B = len(label_B)
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand(B, generator=generator)
    radius = rand(6, 12)
    cx, cy = (radius + 1 + (size - 2 * radius - 2) * torch.rand(B, generator=generator) for _ in range(2))
    colour = torch.randint(len(PALETTE), (B,), generator=generator) if colour_B is None else colour_B
    n = size * supersample
    grid = (torch.arange(n) + 0.5) / supersample  # sub-pixel centres, in pixels
    u = (grid.view(1, 1, n) - cx.view(B, 1, 1)) / radius.view(B, 1, 1)
    v = (grid.view(1, n, 1) - cy.view(B, 1, 1)) / radius.view(B, 1, 1)
    mask_BNN = torch.zeros(B, n, n)
    for c, shape in enumerate(SHAPES):
        rows = label_B == c
        if rows.any():
            mask_BNN[rows] = inside(shape, u[rows].expand(-1, n, n), v[rows].expand(-1, n, n)).float()
    mask_B1HW = F.avg_pool2d(mask_BNN.unsqueeze(1), supersample)
    images = BACKGROUND * (1 - mask_B1HW) + PALETTE_RGB[colour].view(B, 3, 1, 1) * mask_B1HW
    return images, dict(label=label_B, radius=radius, cx=cx, cy=cy, colour=colour, area=mask_B1HW.mean((1, 2, 3)))


def draw_batch(batch: int, generator: torch.Generator):
    """A batch of random classes and their images in [0, 1]."""
    label_B = torch.randint(len(SHAPES), (batch,), generator=generator)
    return label_B, draw(label_B, generator)[0]


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

def quantize_for_training(quant: vg.MultiScaleQuantizer, f_BChw, beta: float = 0.25):
    """f_st (straight-through f_hat), the VQ loss, and how often each code was chosen. (B, C, h, w), (), (V,)"""
    f_rest, f_hat = f_BChw.detach().clone(), torch.zeros_like(f_BChw)
    hits_V = torch.zeros(quant.embedding.num_embeddings)
    vq_loss = 0.0
    for si in range(len(quant.patch_nums)):
        idx_Bl = quant.nearest_tokens(f_rest, si)                    # argmin: no gradient
        h_BChw = quant.scale_contribution(si, idx_Bl)                # gradient to the codebook and phi_si
        f_hat = f_hat + h_BChw
        f_rest = f_rest - h_BChw.detach()
        hits_V += idx_Bl.flatten().bincount(minlength=len(hits_V))
        vq_loss = vq_loss + F.mse_loss(f_hat, f_BChw.detach()) + beta * F.mse_loss(f_hat.detach(), f_BChw)
    return f_BChw + (f_hat - f_BChw).detach(), vq_loss / len(quant.patch_nums), hits_V


def train_vae(steps: int, generator: torch.Generator, batch: int = 8, lr: float = 2e-3, log=print):
    """The trained VQ-VAE and its reconstruction loss at every step."""
    vae = vg.build_vae(vg.TOY_ARCH).requires_grad_(True).train()  # built frozen for GRPO; trainable here
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    hits_V = torch.zeros(vg.TOY_ARCH["vocab_size"])
    losses = []
    for step in range(steps):
        for g in opt.param_groups:  # cosine decay to 0
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        _, images = draw_batch(batch, generator)
        x_B3HW = images * 2 - 1                                       # the VQ-VAE works in [-1, 1]
        f_BChw = vae.quant_conv(vae.encoder(x_B3HW))
        f_st, vq_loss, hits = quantize_for_training(vae.quantize, f_BChw)
        recon = vae.decoder(vae.post_quant_conv(f_st))
        rec_loss = F.mse_loss(recon, x_B3HW)
        opt.zero_grad(); (rec_loss + vq_loss).backward(); opt.step()
        losses.append(rec_loss.item())
        hits_V += hits
        if (step + 1) % 100 == 0 and step < 0.8 * steps:  # re-seed dead codes, not in the last 20% of training
            dead = (hits_V == 0).nonzero().squeeze(1)
            if len(dead):
                pool_NC = f_BChw.detach().permute(0, 2, 3, 1).reshape(-1, f_BChw.shape[1])
                pick = torch.randint(len(pool_NC), (len(dead),), generator=generator)
                vae.quantize.embedding.weight.data[dead] = pool_NC[pick]
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
            x_BLCv = vae.quantize.tokens_to_var_input(tokens)
        dropped = torch.rand(batch, generator=generator) < class_dropout
        cond_B = torch.where(dropped, var.num_classes, label_B)     # the null class, as in sampling's CFG branch
        logits_BLV = var(cond_B, x_BLCv)
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
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % var.num_classes
    hits = [accuracy(judge, vg.sample(var, vae, labels[i:i + batch], cfg, generator=gen).image, labels[i:i + batch])
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
# 5. Export, and the whole recipe
# ----------------------------------------------------------------------------------------------------------

def export(model: nn.Module, path: Path):
    """A plain fp16 state_dict with the official key names: what load_weights reads, half the bytes of fp32."""
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)


def reload(model: nn.Module, path: Path) -> nn.Module:
    """The exported weights as var_grpo loads them (fp16 rounded, then fp32): every figure is measured on these."""
    return vg.load_weights(model, path).eval().requires_grad_(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain the toy world's judge, VQ-VAE and VAR from scratch.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-steps", type=int, default=800)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--var-steps", type=int, default=4000)
    parser.add_argument("--out", default=str(TOY_DIR), help="where the weights and their README go")
    parser.add_argument("--quick", action="store_true", help="a smoke run of 20 steps per stage")
    args = parser.parse_args(argv)
    if args.quick:
        args.judge_steps = args.vae_steps = args.var_steps = 20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    held_out = torch.Generator().manual_seed(10_000 + args.seed)  # images no stage ever trained on
    test_labels = torch.arange(1000) % len(SHAPES)
    test_images = draw(test_labels, held_out)[0]
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
    report["vae_psnr_db"] = psnr_db(vae, test_images)
    report["judge_accuracy_reconstructed"] = accuracy(judge, recon, test_labels)

    t0 = time.time()
    var, _ = train_var(vae, args.var_steps, gen)
    export(var, out / "var.pth")
    var = reload(vg.build_var(vg.TOY_ARCH, vg.TOY_DEPTH), out / "var.pth")
    times["var"] = time.time() - t0
    for cfg in (0.0, 1.5, 3.0):
        report[f"sample_accuracy_cfg{cfg}"] = sample_accuracy(var, vae, judge, 1000, cfg, seed=1)

    report = {k: round(v, 4) for k, v in report.items()}
    minutes = {k: round(v / 60, 2) for k, v in times.items()}
    command = "python notebooks/toy_world.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = dict(command=command.strip(), seed=args.seed, steps=dict(judge=args.judge_steps, vae=args.vae_steps,
                  var=args.var_steps), minutes=minutes, torch=torch.__version__, threads=torch.get_num_threads(), **report)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
