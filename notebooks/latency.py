"""
latency.py -- claim 3 measured (07_latency.ipynb): what sampling, and a GRPO step, cost with VAR and with a diffusion
transformer, in one run on one machine, with random weights of the published shapes and classifier-free guidance on.

    python notebooks/latency.py [--quick] [--device cpu|cuda] --out DIR      writes DIR/latency.json

The policies: VAR-d16 and VAR-d30 (var_grpo's `sample`, whole: 10 scales, the KV cache, the VQ-VAE decode) against
DiT-XL/2 (Peebles & Xie 2023, written below from the paper) at 250 DDPM steps and 50 DDIM steps; and, whole on any
machine, the toy VAR-d2 against a toy DiT of its width and depth on the toy latent at 50 steps. A full-size diffusion
sampling is timed over K denoising steps and multiplied by its N steps; its row says "K steps x N". FLOPs are torch's
FlopCounterMode (2 a multiply-add, attention included). A GRPO step per image is its sampling plus the passes the
update needs: VAR one teacher-forced pass with gradients and one of pi_ref; a diffusion policy one of each per trained
denoising step (flow_grpo's setting: 10 sampling steps, 9 of them trained). The reward's cost is the same for both and
left out.
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
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import var_grpo as vg  # noqa: E402

CFG = 1.5  # guidance on for every policy: the conditional and null-class halves run as one batch of 2B
ANCHORS = {  # what the papers measured, for the ratios beside them
    "VAR paper (arXiv 2404.02905, Table 1): DiT-XL/2 at 250 steps against VAR-d30, time": 45.0,
    "HART (arXiv 2410.10812): DiT-XL/2 113 s against VAR-d30 2.6 s for 64 images on an A100": 113 / 2.6,
}
FLOW_GRPO = dict(sampling_steps=10, trained_steps=9,  # yifan123/flow_grpo config/grpo.py, pickscore_sd3: num_steps 10,
                 source="flow_grpo config/grpo.py (pickscore_sd3): sample.num_steps 10, train.timestep_fraction 0.99 "
                        "-> int(10 x 0.99) = 9 trained steps, CFG and a KL reference pass in training")


# torch counts attention on CUDA and on the meta device, not the CPU kernel: the same count for it (two matmuls)
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    B, H, Lq, E = query_shape
    return 2 * B * H * Lq * key_shape[2] * (E + value_shape[-1])


# ----------------------------------------------------------------------------------------------------------
# DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): a ViT on the patches of a noisy latent,
# conditioned on the diffusion time t and the class by adaLN-Zero. XL/2: depth 28, width 1152, 16 heads, patch 2 on
# the 32 x 32 x 4 latent of the SD VAE (256 px), 256 tokens; it predicts the noise and (learn_sigma) a variance.
# ----------------------------------------------------------------------------------------------------------

def time_features(t_B, dim: int = 256):
    """DiT's sinusoidal features of the diffusion time t (its TimestepEmbedder's fixed first stage). (B, dim)"""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t_B.device) / (dim // 2))
    angles_BF = t_B.float()[:, None] * freqs[None]
    return torch.cat([angles_BF.cos(), angles_BF.sin()], dim=1)


def sincos_positions(side: int, C: int):
    """Fixed 2-D sin-cos position embedding of a side x side grid, half the channels for each axis. (1, side^2, C)"""
    freqs = 1 / 10000 ** (torch.arange(C // 4) / (C // 4))
    rows, cols = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    parts = [f(axis.reshape(-1, 1) * freqs) for axis in (cols, rows) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).unsqueeze(0)


class DiTBlock(nn.Module):
    """adaLN-Zero (DiT §3.2): LayerNorms without their own scale, shifted and scaled by the condition, and each residual
    branch gated by it (the gate starts at zero in training; here the weights are random)."""
    def __init__(self, C: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = (nn.LayerNorm(C, elementwise_affine=False, eps=1e-6) for _ in range(2))
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc1, self.fc2 = nn.Linear(C, int(C * mlp_ratio)), nn.Linear(int(C * mlp_ratio), C)
        self.modulation = nn.Linear(C, 6 * C)  # after a SiLU: shift, scale, gate for attention, then for the MLP

    def forward(self, x_BNC, c_BC):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c_BC)).unsqueeze(1).chunk(6, dim=-1)
        B, N, C = x_BNC.shape
        h_BNC = self.norm1(x_BNC) * (1 + scale1) + shift1
        q, k, v = self.qkv(h_BNC).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, C/H)
        x_BNC = x_BNC + gate1 * self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        h_BNC = self.norm2(x_BNC) * (1 + scale2) + shift2
        return x_BNC + gate2 * self.fc2(F.gelu(self.fc1(h_BNC), approximate="tanh"))


class DiT(nn.Module):
    def __init__(self, depth=28, width=1152, heads=16, patch=2, latent_side=32, latent_channels=4, num_classes=1000):
        super().__init__()
        self.patch, self.channels, self.num_classes = patch, latent_channels, num_classes
        self.patch_embed = nn.Conv2d(latent_channels, width, patch, stride=patch)
        self.register_buffer("pos_1NC", sincos_positions(latent_side // patch, width))  # fixed, as in DiT
        self.time_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.class_emb = nn.Embedding(num_classes + 1, width)  # index num_classes: the null class of CFG
        self.blocks = nn.ModuleList([DiTBlock(width, heads) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(width, 2 * width)
        self.head = nn.Linear(width, patch * patch * 2 * latent_channels)  # noise and variance of each latent value

    def forward(self, x_BCHW, t_B, label_B):
        """The predicted noise and variance of a noisy latent at time t. (B, 2 C, H, W)"""
        B, _, H, W = x_BCHW.shape
        p = self.patch
        x_BNC = self.patch_embed(x_BCHW).flatten(2).transpose(1, 2) + self.pos_1NC
        c_BC = self.time_mlp(time_features(t_B)) + self.class_emb(label_B)
        for block in self.blocks:
            x_BNC = block(x_BNC, c_BC)
        shift, scale = self.modulation_out(F.silu(c_BC)).unsqueeze(1).chunk(2, dim=-1)
        out_BNP = self.head(self.norm_out(x_BNC) * (1 + scale) + shift)
        out = out_BNP.view(B, H // p, W // p, p, p, 2 * self.channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, 2 * self.channels, H, W)


def alphas_bar(steps: int, device):
    """DiT's noise schedule (linear betas 1e-4..0.02 over 1000 steps) at `steps` evenly spaced times, last first:
    the times t and abar_t = prod_{s<=t} (1 - beta_s)."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t = torch.linspace(0, 999, steps).round().long().flip(0)
    return t.to(device), abar[t].float().to(device)


@torch.no_grad()
def diffusion_sample(dit: DiT, label_B, steps: int, ddim: bool, decode=None, only_steps: int = 0, cfg: float = CFG):
    """A latent (and, with `decode`, its image) by `steps` denoising steps from noise: DDPM's ancestral step with the
    fixed posterior variance (DiT learns it; the same cost), or DDIM's deterministic one (eta 0). only_steps > 0 stops
    after that many steps, for timing. Guidance on the predicted noise, both halves as one batch."""
    B, side = label_B.shape[0], dit.pos_1NC.shape[1] ** 0.5 * dit.patch
    x = torch.randn(B, dit.channels, int(side), int(side), device=label_B.device)
    t, abar = alphas_bar(steps, label_B.device)
    labels_2B = with_cfg(label_B, dit.num_classes)
    for i in range(only_steps or steps):
        with vg.autocast(label_B.device):
            eps_cond, eps_null = dit(x.repeat(2, 1, 1, 1), t[i].expand(2 * B), labels_2B)[:, :dit.channels].float().chunk(2)
        eps = eps_null + cfg * (eps_cond - eps_null)
        a, a_prev = abar[i], abar[i + 1] if i + 1 < steps else torch.ones_like(abar[i])
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if ddim:
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        else:
            beta = 1 - a / a_prev
            x = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a)
            x = x + (beta * (1 - a_prev) / (1 - a)).sqrt() * torch.randn_like(x) if i + 1 < steps else x
    return decode(x) if decode is not None else x


# ----------------------------------------------------------------------------------------------------------
# Measuring: seconds by the wall clock after a warm-up run (which FlopCounterMode counts), synchronised on a GPU.
# ----------------------------------------------------------------------------------------------------------

def seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def counted(fn):
    """Runs fn once (the warm-up): the FLOPs it did, and what it returned."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def counted_and_timed(fn, device, quick: bool):
    """FLOPs, seconds and result of fn: timed after the counted warm-up, or (quick) the counted run timed itself."""
    if not quick:
        flops, result = counted(fn)
        return flops, seconds(fn, device), result
    start = time.perf_counter()
    flops, result = counted(fn)
    return flops, seconds(lambda: None, device) + time.perf_counter() - start, result


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def with_cfg(label_B, num_classes: int):
    return torch.cat((label_B, torch.full_like(label_B, num_classes)))  # the conditional half, then the null class


def var_rows(name: str, arch: dict, depth: int, batch: int, device, quick: bool = False) -> tuple:
    """VAR's sampling, whole, and its GRPO step: the sampling and the update's two teacher-forced passes (quick: the
    sampling alone, timed on its counted run)."""
    torch.manual_seed(0)
    with torch.device(device):
        vae, var = vg.build_vae(arch), vg.build_var(arch, depth)
    label_B, seeds = torch.arange(batch, device=device) % var.num_classes, list(range(batch))
    draw = lambda: vg.sample(var, vae, label_B, seeds, cfg=CFG)  # noqa: E731
    flops, sampling_s, drawn = counted_and_timed(draw, device, quick)
    sampling_s /= batch
    row = dict(model=name, params=params(var), forward_passes=len(var.patch_nums), gflops_per_image=flops / batch / 1e9,
               seconds_per_image=sampling_s, batch=batch, measured="whole",
               decoder=f"VQ-VAE decode included ({params(vae.decoder) / 1e6:.1f}M parameters)")
    if quick:
        return [row], None

    def update():  # the policy's teacher-forced pass with gradients, then pi_ref's without
        vg.token_logprobs(var, vae, label_B, drawn.tokens, CFG, 1.0).sum().backward()
        with torch.no_grad():
            vg.token_logprobs(var, vae, label_B, drawn.tokens, CFG, 1.0)
    update()
    var.zero_grad(set_to_none=True)
    update_s = seconds(update, device) / batch
    step = dict(policy=name, sampling_s=sampling_s, update_passes="1 teacher-forced pass with gradients + 1 of pi_ref",
                update_s=update_s, step_s_per_image=sampling_s + update_s)
    return [row], step


def dit_rows(name: str, dit: DiT, batch: int, device, schedules, timed_steps: int, decoder=None,
             quick: bool = False) -> tuple:
    """DiT's sampling at each (label, steps, ddim) of `schedules`, timed over `timed_steps` denoising steps (0: all) and
    `decoder` (an nn.Module from latent to image, or None: left out); its GRPO step in flow_grpo's setting. quick: one
    step, counted and timed in one run, for every schedule, and no GRPO step."""
    label_B = torch.arange(batch, device=device) % dit.num_classes
    one_step = lambda: diffusion_sample(dit, label_B, 50, True, only_steps=1)  # noqa: E731
    step_flops, step_s, z = counted_and_timed(one_step, device, quick)  # one denoising step, both CFG halves
    decode_flops, decode_s = (counted(lambda: decoder(z))[0], seconds(lambda: decoder(z), device)) if decoder else (0, 0)
    rows = []
    for label, steps, ddim in schedules:
        k = 1 if quick else min(timed_steps or steps, steps)
        s = step_s if quick else seconds(lambda: diffusion_sample(dit, label_B, steps, ddim, only_steps=k), device)
        rows.append(dict(model=f"{name}, {label}", params=params(dit), forward_passes=steps,
                         gflops_per_image=(step_flops * steps + decode_flops) / batch / 1e9,
                         seconds_per_image=(s * steps / k + decode_s) / batch, batch=batch,
                         measured="whole" if k == steps else f"{k} steps x {steps / k:g}",
                         decoder=f"latent decoder included ({params(decoder) / 1e6:.1f}M parameters)" if decoder
                         else "latent decoder left out"))
    if quick:
        return rows, None
    per_step_s = (rows[-1]["seconds_per_image"] - decode_s / batch) / rows[-1]["forward_passes"]
    x = torch.randn(2 * batch, dit.channels, *z.shape[2:], device=device)
    t, labels_2B = torch.full((2 * batch,), 500, device=device), with_cfg(label_B, dit.num_classes)

    def update():  # one trained denoising step: the policy's pass with gradients on both halves, then pi_ref's
        with vg.autocast(device):
            dit(x, t, labels_2B).float().sum().backward()
            with torch.no_grad():
                dit(x, t, labels_2B)
    update()
    dit.zero_grad(set_to_none=True)
    update_s = seconds(update, device) / batch
    sampling_s = per_step_s * FLOW_GRPO["sampling_steps"] + decode_s / batch
    step = dict(policy=f"{name}, flow_grpo's setting", sampling_s=sampling_s,
                update_passes=f"{FLOW_GRPO['trained_steps']} x (1 pass with gradients + 1 of pi_ref); "
                              f"{FLOW_GRPO['source']}",
                update_s=FLOW_GRPO["trained_steps"] * update_s,
                step_s_per_image=sampling_s + FLOW_GRPO["trained_steps"] * update_s)
    return rows, step


def random_(model: nn.Module, device) -> nn.Module:
    """Random weights, fast: built on the meta device, each matrix filled from one pool of 2^20 normal draws scaled by
    1/sqrt(fan-in), vectors zero (torch's own initialisation of 675M weights takes ~15 s of a CPU; values do not change
    what a forward pass costs, as long as they are finite and not denormal)."""
    model = model.to_empty(device=device)
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).to(device)
    for p in model.parameters():
        with torch.no_grad():
            n, fan_in = p.numel(), p[0].numel() if p.dim() > 1 else 0
            p.copy_((pool.repeat(-(-n // pool.numel()))[:n] / math.sqrt(fan_in)).view_as(p) if fan_in else torch.zeros_like(p))
    return model


def new_dit(device, **shape) -> DiT:
    """A DiT of DiT-XL/2's shape (or `shape`), random weights, on `device`; its fixed positions computed there."""
    with torch.device("meta"):
        dit = DiT(**shape)
    side = dit.pos_1NC.shape[1]
    dit = random_(dit, device)
    dit.pos_1NC = sincos_positions(int(side ** 0.5), dit.pos_1NC.shape[2]).to(device)
    return dit


class ToyDecoder(nn.Module):
    """The toy VQ-VAE's decoder, latent to image: a toy DiT's latent has the toy VAR's latent shape."""
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.fhat_to_img(z)


def toy_dit(device) -> DiT:
    """A DiT of the toy VAR-d2's width and depth on its 8 x 8 x 16 latent, patch 1 (64 tokens)."""
    width = vg.build_var(vg.TOY_ARCH, vg.TOY_DEPTH).C
    return new_dit(device, depth=vg.TOY_DEPTH, width=width, heads=vg.TOY_DEPTH, patch=1, latent_side=vg.TOY_ARCH["patch_nums"][-1],
               latent_channels=vg.TOY_ARCH["z_channels"], num_classes=vg.TOY_ARCH["num_classes"])


def sd_vae_decoder() -> nn.Module:
    """An LDM decoder of the SD VAE's shape (ch 128, mult 1,2,4,4, 2 res blocks, z 4), by var_grpo's Decoder; it has
    attention at its coarsest level besides the middle, which SD's has only in the middle (a few % of its FLOPs)."""
    return vg.Decoder(128, 4, ch_mult=(1, 2, 4, 4), num_res_blocks=2)


def measure(device: str = "cpu", quick: bool = False, log=print) -> dict:
    """The record: the toy scale whole, then full size (quick: VAR-d16's sampling and one DiT step at batch 1, each
    counted and timed in one run, no decoder, no full-size GRPO step)."""
    dev = torch.device(device)
    rows, steps = [], []

    def add(result):
        rows.extend(result[0])
        steps.extend([result[1]] if result[1] else [])
        for row in result[0]:
            log(f"{row['model']:<34} {row['params'] / 1e6:8.1f}M params {row['forward_passes']:4d} passes "
                f"{row['gflops_per_image']:10.1f} GFLOP/image {row['seconds_per_image']:9.3f} s/image ({row['measured']})")

    toy_batch = 8  # a group of G = 8
    add(var_rows("toy VAR-d2", vg.TOY_ARCH, vg.TOY_DEPTH, toy_batch, dev))
    torch.manual_seed(0)
    dit = toy_dit(dev)
    with torch.device(dev):
        decoder = ToyDecoder(vg.build_vae(vg.TOY_ARCH))
    add(dit_rows("toy DiT-d2", dit, toy_batch, dev, [("50 DDIM steps", 50, True)], 0, decoder))
    for batch in [1] if dev.type == "cpu" else [8, 64]:  # a CPU times one image; --device cuda a group and 64
        for depth in (16,) if quick else (16, 30):
            add(var_rows(f"VAR-d{depth}", vg.OFFICIAL_ARCH, depth, batch, dev, quick))
        torch.manual_seed(0)
        dit = new_dit(dev)
        with torch.device(dev):
            decoder = None if quick else sd_vae_decoder()
        add(dit_rows("DiT-XL/2", dit, batch, dev, [("250 DDPM steps", 250, False), ("50 DDIM steps", 50, True)],
                     2 if dev.type == "cpu" else 0, decoder, quick))
        del dit, decoder
    return dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                quick=quick, torch=torch.__version__, cfg=CFG, rows=rows, grpo_step=steps,
                ratios=ratios(rows, steps), anchors=ANCHORS)


def ratios(rows: list, steps: list) -> dict:
    """Diffusion over VAR, in seconds and FLOPs per image, at the same batch: sampling and a GRPO step."""
    out = {}
    by = {(r["model"], r["batch"]): r for r in rows}
    for (model, batch), r in by.items():
        if "DiT" not in model:
            continue
        toy = model.startswith("toy")
        for var in ["toy VAR-d2"] if toy else ["VAR-d16", "VAR-d30"]:
            v = by.get((var, batch))
            if v:
                out[f"{model} / {var}, batch {batch}, seconds"] = r["seconds_per_image"] / v["seconds_per_image"]
                out[f"{model} / {var}, batch {batch}, FLOPs"] = r["gflops_per_image"] / v["gflops_per_image"]
    policies = {s["policy"]: s for s in steps}
    for dit, var in (("toy DiT-d2, flow_grpo's setting", "toy VAR-d2"), ("DiT-XL/2, flow_grpo's setting", "VAR-d16"),
                     ("DiT-XL/2, flow_grpo's setting", "VAR-d30")):
        if dit in policies and var in policies:
            out[f"GRPO step: {dit} / {var}"] = policies[dit]["step_s_per_image"] / policies[var]["step_s_per_image"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the toy scale whole, full size VAR-d16 and one DiT step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16, batches 8 and 64")
    parser.add_argument("--out", required=True, help="folder for latency.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here; use --device cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = measure(args.device, args.quick)
    (out / "latency.json").write_text(json.dumps(record, indent=1) + "\n")
    for key, value in record["ratios"].items():
        print(f"{key}: {value:.1f}x")
    print(f"wrote {out / 'latency.json'}")
    return record


if __name__ == "__main__":
    main()
