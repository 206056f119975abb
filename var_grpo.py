"""
var_grpo.py -- fine-tune a next-scale Visual AutoRegressive model (VAR) with GRPO, in one file.

Reference implementation of "Fine-Tuning Next-Scale Visual Autoregressive Models with Group Relative
Policy Optimization" (arXiv 2505.23331) on top of VAR (Tian et al. 2024, FoundationVision/VAR, MIT).
The VAR tokenizer and transformer below load the official checkpoints (vae_ch160v4096z32.pth,
var_d{16,20,24,30}.pth) unchanged and reproduce the official outputs number for number.

The model (VAR, paper sec. 3)
  1. Tokenizer. A CNN encoder maps an image to a latent f (Cvae x h x w, h = w = 16 at 256 px). Residual
     quantisation over K scales (patch_nums 1,2,3,4,5,6,8,10,13,16) turns f into K token maps r_1..r_K:
       for k = 1..K:  r_k = argmin_v || area_down(f - f_hat, h_k) - e_v ||        (nearest codebook entry)
                      f_hat += phi_k( bicubic_up(e[r_k], h) )                      (phi_k: a 3x3 conv, mixed 50/50)
     The decoder maps f_hat back to pixels. 680 tokens in all at 256 px, vocabulary V = 4096.
  2. Transformer. A GPT-style decoder with adaptive layer norm on the class label c predicts every token of
     scale k at once, attending to all tokens of scales 1..k-1 (block-causal mask):
       p(r_1, ..., r_K | c) = prod_k p(r_k | r_<k, c),   p(r_k | r_<k, c) = prod_{i in scale k} p(r_k,i | r_<k, c)
     The input for scale k is f_hat after k-1 scales, area-downsampled to h_k x h_k.
  3. Sampling: 10 forward passes (one per scale) with a KV cache and classifier-free guidance ramped over scales:
       l_k = (1 + t_k) l_k(c) - t_k l_k(null),   t_k = cfg * (k-1)/(K-1)
     then temperature, optional top-k / top-p, and a multinomial draw.

The fine-tuning (GRPO, Shao et al. 2024, as used in the paper)
  4. The policy pi_theta is VAR given an ImageNet class c; the text prompt enters only through the reward.
     Each step draws P classes and samples a group of G images per class (P*G images) with pi_old = pi_theta.
  5. Reward r = sum_j w_j R_j(image): CLIP cosine similarity to the prompt, LAION aesthetic score, or a pixel
     statistic; all from one CLIP forward pass.
  6. Group-relative advantage, one per image:  A_i = (r_i - mean_group(r)) / (std_group(r) + eps).
  7. Per token t of image i, with rho = exp(log pi_theta(a_t) - log pi_old(a_t)) and the guided, temperature-scaled
     distribution of step 3 (the one the token was actually drawn from):
       L_i = mean_t [ -min(rho A_i, clip(rho, 1-eps_clip, 1+eps_clip) A_i) + beta * KL_t ]
       KL_t = exp(q) - q - 1,  q = log pi_ref(a_t) - log pi_theta(a_t)      (k3 estimator, pi_ref frozen at start)
     L = mean_i L_i: every image counts equally and, inside an image, every one of its 680 tokens counts equally
     (so the 256 tokens of the last scale carry 256/680 of the weight, the single first token 1/680).
  8. A few epochs of AdamW over minibatches of the P*G samples; then back to 4.

Sections, in pipeline order: config | weights | tokenizer | transformer + sampler | rewards | GRPO | main.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# Config. One dataclass; the string under each field is its --help (read from this source by parse_config).
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Config:
    depth: int = 16
    """VAR depth: 16, 20, 24 or 30 (official checkpoint var_d{depth}.pth; width = 64*depth)"""
    vae_ckpt: str = ""
    """local path of vae_ch160v4096z32.pth; empty: download it into the cache"""
    var_ckpt: str = ""
    """local path of var_d{depth}.pth (or weights this script exported); empty: download it into the cache"""
    cache_dir: str = ""
    """where downloaded weights are kept; empty: $VAR_GRPO_CACHE, else ~/.cache/var_grpo"""
    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    seed: int = 0
    """seed of every random stream (sampling, class draws, initialisation)"""
    tiny: bool = False
    """use small random models on CPU instead of the real weights (demonstrates the mechanics; images are noise)"""
    bench: bool = False
    """benchmark sampling and the teacher-forced pass at --depth with random weights, then exit"""
    bench_batch: int = 2
    """batch size for --bench"""
    cfg: float = 1.5
    """classifier-free guidance strength; ramped linearly over scales from 0 to cfg (official sampler)"""
    temperature: float = 1.0
    """sampling temperature applied to the guided logits"""
    top_k: int = 0
    """keep only the k most likely tokens when sampling (0: off)"""
    top_p: float = 0.0
    """keep the smallest set of tokens with this much probability when sampling (0: off)"""


def field_help(cls=Config) -> dict:
    """{field name: the docstring written under it}, parsed from this file's source."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def parse_config(argv: Optional[List[str]] = None) -> Config:
    """The command line is derived from Config: one --flag per field, its docstring as help."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_help()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=helps[f.name])
    return Config(**vars(parser.parse_args(argv)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on GPU (as the official code runs), plain fp32 on CPU (exact parity)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# The architecture of the official checkpoints (FoundationVision/VAR models/__init__.py: build_vae_var).
# width = 64 * depth and heads = depth for every official depth; --tiny swaps in TINY_ARCH.
OFFICIAL_ARCH = dict(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, quant_resi=0.5,
                     patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), num_classes=1000,
                     attn_l2_norm=True, shared_aln=False, norm_eps=1e-6, mlp_ratio=4.0)
TINY_ARCH = dict(OFFICIAL_ARCH, vocab_size=256, ch=32, patch_nums=(1, 2, 3, 4), num_classes=10)
TINY_DEPTH = 2


# ----------------------------------------------------------------------------------------------------------
# Weights. The official files live on Hugging Face; we download them once with requests into a cache,
# resuming interrupted downloads and checking the sha256 the server reports, then load them with
# strict=True so that any mismatch with the official architecture is an error, not a silent wrong model.
# ----------------------------------------------------------------------------------------------------------

VAR_URL = "https://huggingface.co/FoundationVision/var/resolve/main/"
VAE_FILE = "vae_ch160v4096z32.pth"


class WeightsError(RuntimeError):
    """A weight file could not be downloaded or does not fit the model; the message says what to do."""


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.cache_dir or os.environ.get("VAR_GRPO_CACHE") or Path.home() / ".cache" / "var_grpo")


def _reported_sha256(response: requests.Response) -> Optional[str]:
    """Hugging Face reports a large (LFS) file's sha256 as its X-Linked-Etag (on the redirect) or ETag."""
    for r in [*response.history, response]:
        for name in ("X-Linked-Etag", "ETag"):
            tag = r.headers.get(name, "").strip().strip('"').removeprefix("W/").strip('"').lower()
            if len(tag) == 64 and all(c in "0123456789abcdef" for c in tag):
                return tag
    return None


def download(url: str, dest: Path, attempts: int = 3, timeout: float = 30.0) -> Path:
    """Download url to dest unless dest exists. Bytes stream into dest.part, which survives an interruption
    and is resumed with an HTTP Range request; dest appears only once the file is complete and verified."""
    from tqdm import tqdm
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    manual = (f"You can download it by hand (e.g. in a browser) and save it as {dest}, "
              f"or pass its local path with --vae-ckpt / --var-ckpt / --clip-ckpt.")
    for attempt in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 416:  # the .part already holds the whole file
                    pass
                elif r.status_code not in (200, 206):
                    raise WeightsError(f"Downloading {url} failed: HTTP {r.status_code} {r.reason}. {manual}")
                else:
                    if r.status_code == 200:  # the server ignored Range: start over
                        have = 0
                    size = r.headers.get("Content-Length")
                    total = have + int(size) if size is not None else None
                    expected_sha = _reported_sha256(r)
                    with open(part, "ab" if have else "wb") as f, tqdm(
                            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                        for chunk in r.iter_content(chunk_size=1 << 16):  # small reads: little is lost if cut
                            f.write(chunk)
                            bar.update(len(chunk))
                    if total is not None and part.stat().st_size < total:
                        raise requests.ConnectionError(f"connection closed at {part.stat().st_size} of {total} bytes")
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == attempts - 1:
                raise WeightsError(f"Downloading {url} was interrupted ({e}); {part.stat().st_size if part.exists() else 0} "
                                   f"bytes are kept in {part} and the next run resumes from there. {manual}") from e
            print(f"download of {dest.name} interrupted ({e}); resuming", file=sys.stderr)
            continue
        if r.status_code == 416:
            expected_sha = _reported_sha256(r)
        if expected_sha is not None:
            h = hashlib.sha256()
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            if h.hexdigest() != expected_sha:
                part.unlink()  # corrupt: never let it become the cached file, and don't resume from it
                raise WeightsError(f"Downloaded {url} but its sha256 is {h.hexdigest()}, not {expected_sha} as the "
                                   f"server reports: the file is corrupt and was deleted. Run again, or: {manual}")
        os.replace(part, dest)
        return dest
    raise AssertionError("unreachable")


def weight_path(local: str, url: str, cfg: Config) -> Path:
    """A user-given local file (no network needed), else the cached copy of url, downloaded if missing."""
    if local:
        if not Path(local).is_file():
            raise WeightsError(f"{local} does not exist; give the path of a weight file that does.")
        return Path(local)
    return download(url, cache_dir(cfg) / url.rsplit("/", 1)[-1])


def read_state_dict(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path} is not a PyTorch checkpoint that torch.load(weights_only=True) can read ({e}). "
                           f"Pass an official VAR/VQVAE .pth file or one this script exported.") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
        raise WeightsError(f"{path} is not a plain state_dict of tensors (it holds {keys}). Pass an official "
                           f"VAR/VQVAE .pth file or the exported var_final.pth (training checkpoints go to --resume).")
    return sd


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a state_dict with the official key names into a model built on the meta device (no init cost)."""
    sd = read_state_dict(path)
    if isinstance(model, VAR) and "class_emb.weight" in sd and sd["class_emb.weight"].shape[1] != model.C:
        width = sd["class_emb.weight"].shape[1]
        raise WeightsError(f"{path} looks like VAR-d{width // 64} (width {width}) but depth {model.depth} was asked "
                           f"(width {model.C}). Pass --depth {width // 64} or the var_d{model.depth}.pth file.")
    want = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k])}" for k in want if k in sd and sd[k].shape != want[k]]
    if missing or unexpected or wrong:
        what = type(model).__name__
        raise WeightsError(f"{path} does not fit the {what} that was built: missing keys {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                           f"{' ...' if len(unexpected) > 10 else ''}, shape mismatches {wrong[:10]}. "
                           f"Check that the file is the {what} checkpoint and that --depth matches it.")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float()  # the fixtures store fp16; the official files fp32


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: the multi-scale residual VQ-VAE (paper sec. 3.2; official models/vqvae.py, basic_vae.py,
# quant.py). Encoder and decoder are the VQGAN/LDM f16 CNN; what is new is the quantiser, which explains
# the latent f as a sum of K token maps of growing resolution, each one quantising what the coarser ones
# left unexplained. Module names follow the official ones so that the checkpoint loads unchanged.
# ----------------------------------------------------------------------------------------------------------

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""
    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj_out = group_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x_BChw):
        B, C, H, W = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # the official code does the same softmax(qk/sqrt(C))v with bmm
        return x_BChw + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Resample(nn.Module):
    """2x down (zero-pad right/bottom, 3x3 stride-2 conv) or 2x up (nearest, 3x3 conv), as in VQGAN."""
    def __init__(self, c: int, up: bool):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


CH_MULT, NUM_RES_BLOCKS = (1, 1, 2, 2, 4), 2  # the official VQVAE's fixed shape: 16x downsampling


class Encoder(nn.Module):
    def __init__(self, ch: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for level, mult in enumerate(CH_MULT):
            last = level == len(CH_MULT) - 1
            stage = nn.Module()
            stage.block = nn.ModuleList([ResnetBlock(c_in if i == 0 else ch * mult, ch * mult) for i in range(NUM_RES_BLOCKS)])
            stage.attn = nn.ModuleList([AttnBlock(ch * mult) for _ in range(NUM_RES_BLOCKS)] if last else [])
            if not last:
                stage.downsample = Resample(ch * mult, up=False)
            self.down.append(stage)
            c_in = ch * mult
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)
        self.norm_out, self.conv_out = group_norm(c_in), nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x_B3HW):
        h = self.conv_in(x_B3HW)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, z_channels: int):
        super().__init__()
        c_in = ch * CH_MULT[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)
        stages = []
        for level in reversed(range(len(CH_MULT))):  # built coarse to fine, stored fine to coarse (official order)
            c_out = ch * CH_MULT[level]
            stage = nn.Module()
            stage.block = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(NUM_RES_BLOCKS + 1)])
            stage.attn = nn.ModuleList([AttnBlock(c_out) for _ in range(NUM_RES_BLOCKS + 1)] if level == len(CH_MULT) - 1 else [])
            if level != 0:
                stage.upsample = Resample(c_out, up=True)
            stages.insert(0, stage)
            c_in = c_out
        self.up = nn.ModuleList(stages)
        self.norm_out, self.conv_out = group_norm(c_in), nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z_BChw):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z_BChw))))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """phi_k of the paper: h -> (1 - r) h + r conv3x3(h). It repairs the blur of upsampling a coarse token map."""
    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw):
        return h_BChw * (1 - self.ratio) + super().forward(h_BChw) * self.ratio


class MultiScaleQuantizer(nn.Module):
    """Residual quantisation over the scales patch_nums (official VectorQuantizer2, inference parts only).

    Why bicubic up and area down: a token map r_k lives at h_k x h_k but explains part of the full h x h latent,
    so its embedding is upsampled smoothly (bicubic) before phi; the quantity to explain at the next scale is
    the residual averaged over each coarse cell (area), the least-squares best h_k x h_k summary of it.
    """
    def __init__(self, vocab_size: int, z_channels: int, patch_nums, quant_resi: float, share_quant_resi: int):
        super().__init__()
        self.patch_nums = tuple(patch_nums)
        self.embedding = nn.Embedding(vocab_size, z_channels)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))  # training statistic, kept for loading
        # K convolutions phi shared across the scales: scale k uses the one whose tick is nearest to k/(K_scales-1).
        # The official code stores them under three key layouts depending on how many there are.
        K = share_quant_resi or len(patch_nums)
        phis = nn.ModuleList([Phi(z_channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity() for _ in range(K)])
        if share_quant_resi == 0:
            self.quant_resi = phis
        else:
            self.quant_resi = nn.Module()
            if share_quant_resi == 1:
                self.quant_resi.qresi = phis[0]
            else:
                self.quant_resi.qresi_ls = phis
        ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
        S = len(patch_nums)
        self.phi_of_scale = [phis[int(np.argmin(np.abs(ticks - si / (S - 1))))] for si in range(S)]  # plain list: no new keys

    def scale_contribution(self, si: int, idx_Bl):
        """phi_si(upsample(e[r_si])): what scale si's token map adds to f_hat. (B, Cvae, H, W)"""
        B, pn, H = idx_Bl.shape[0], self.patch_nums[si], self.patch_nums[-1]
        h_BChw = self.embedding(idx_Bl).transpose(1, 2).reshape(B, -1, pn, pn)
        if pn != H:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        return self.phi_of_scale[si](h_BChw)

    def add_scale(self, f_hat_BChw, si: int, idx_Bl):
        """f_hat += scale si's contribution (in place): the running reconstruction after scale si."""
        return f_hat_BChw.add_(self.scale_contribution(si, idx_Bl))

    def next_scale_input(self, f_hat_BChw, si: int):
        """The transformer's input for scale si+1: f_hat so far, area-downsampled to that scale. (B, pn*pn, C)"""
        pn = self.patch_nums[si + 1]
        return F.interpolate(f_hat_BChw, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def f_to_tokens(self, f_BChw) -> List[torch.Tensor]:
        """Encode a latent into K token maps, coarse to fine (official f_to_idxBl_or_fhat)."""
        B, C, H, W = f_BChw.shape
        f_rest, f_hat = f_BChw.clone(), torch.zeros_like(f_BChw)
        e_VC = self.embedding.weight
        tokens = []
        for si, pn in enumerate(self.patch_nums):
            z_NC = (F.interpolate(f_rest, size=(pn, pn), mode="area") if pn != H else f_rest).permute(0, 2, 3, 1).reshape(-1, C)
            # squared distances |z|^2 + |e|^2 - 2 z.e, in the official order of operations (exact argmin ties)
            d_NV = (z_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1)).addmm_(z_NC, e_VC.T, alpha=-2)
            idx_Bl = d_NV.argmin(dim=1).view(B, pn * pn)
            tokens.append(idx_Bl)
            h_BChw = self.scale_contribution(si, idx_Bl)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
        return tokens

    def tokens_to_fhat(self, tokens: List[torch.Tensor]):
        """f_hat = sum_k phi_k(upsample(e[r_k])): the latent the decoder turns into pixels (official embed_to_fhat)."""
        H = self.patch_nums[-1]
        f_hat = torch.zeros(tokens[0].shape[0], self.embedding.embedding_dim, H, H, device=tokens[0].device)
        for si, idx_Bl in enumerate(tokens):
            self.add_scale(f_hat, si, idx_Bl)
        return f_hat

    def tokens_to_var_input(self, tokens: List[torch.Tensor]):
        """Teacher-forcing input: for every scale after the first, f_hat of the coarser scales at that scale's
        resolution, concatenated. (B, L - 1, Cvae) (official idxBl_to_var_input)"""
        H = self.patch_nums[-1]
        f_hat = torch.zeros(tokens[0].shape[0], self.embedding.embedding_dim, H, H, device=tokens[0].device)
        inputs = []
        for si in range(len(self.patch_nums) - 1):
            self.add_scale(f_hat, si, tokens[si])
            inputs.append(self.next_scale_input(f_hat, si))
        return torch.cat(inputs, dim=1)


class VQVAE(nn.Module):
    def __init__(self, vocab_size=4096, z_channels=32, ch=160, patch_nums=OFFICIAL_ARCH["patch_nums"],
                 quant_resi=0.5, share_quant_resi=4):
        super().__init__()
        self.encoder, self.decoder = Encoder(ch, z_channels), Decoder(ch, z_channels)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, patch_nums, quant_resi, share_quant_resi)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1), nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.requires_grad_(False).eval()  # frozen: GRPO trains only the transformer

    def img_to_tokens(self, img_B3HW) -> List[torch.Tensor]:
        """Image in [-1, 1] -> K token maps (B, pn*pn), coarse to fine (official img_to_idxBl)."""
        return self.quantize.f_to_tokens(self.quant_conv(self.encoder(img_B3HW)))

    def fhat_to_img(self, f_hat_BChw):
        """Latent -> image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp_(-1, 1)

    def tokens_to_img(self, tokens: List[torch.Tensor]):
        """K token maps -> image in [-1, 1] (official idxBl_to_img(..., same_shape=True, last_one=True))."""
        return self.fhat_to_img(self.quantize.tokens_to_fhat(tokens))


# ----------------------------------------------------------------------------------------------------------
# Transformer: VAR (paper sec. 3.1, official models/var.py, basic_var.py). A GPT-2-like decoder whose layer
# norms are modulated by the class embedding (AdaLN), run over the 680 tokens of all scales at once. The
# block-causal mask lets every token of scale k see all tokens of scales <= k (coarser scales plus its own
# scale's inputs), never a finer scale: scale k's tokens are predicted in parallel from everything coarser.
# ----------------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self, C: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_l2_norm = num_heads, C // num_heads, attn_l2_norm
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))  # keys get no bias; stored in the official checkpoint
        if attn_l2_norm:  # cosine attention with a learned per-head temperature, capped at 100
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(C, C)

    def forward(self, x_BLC, attn_bias=None, kv_cache: Optional[list] = None):
        B, L, C = x_BLC.shape
        qkv = F.linear(x_BLC, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, c)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(math.log(100)).exp())
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        if kv_cache is not None:  # sampling: scale k attends to the cached keys/values of scales < k
            if kv_cache:
                k, v = torch.cat((kv_cache[0], k), dim=2), torch.cat((kv_cache[1], v), dim=2)
            kv_cache[:] = [k, v]
        if attn_bias is not None:
            attn_bias = attn_bias.to(v.dtype)
        out_BHLc = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=attn_bias, scale=scale)
        return self.proj(out_BHLc.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """x += gamma1 * attn(LN(x)(1 + scale1) + shift1);  x += gamma2 * ffn(LN(x)(1 + scale2) + shift2), with the six
    modulation vectors computed from the class embedding (official AdaLNSelfAttn)."""
    def __init__(self, C: int, num_heads: int, mlp_ratio: float, norm_eps: float, attn_l2_norm: bool, shared_aln: bool):
        super().__init__()
        self.C = C
        self.attn = SelfAttention(C, num_heads, attn_l2_norm)
        self.ffn = FFN(C, round(C * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        if shared_aln:  # one modulation MLP for all blocks (VAR.shared_ada_lin) plus a per-block offset
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x_BLC, cond_BD, attn_bias=None, kv_cache=None):
        mod = self.ada_gss + cond_BD if hasattr(self, "ada_gss") else self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)  # each (B, 1, C)
        x_BLC = x_BLC + self.attn(self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1), attn_bias, kv_cache).mul_(gamma1)
        return x_BLC + self.ffn(self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2)).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BLC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class VAR(nn.Module):
    def __init__(self, depth=16, embed_dim=1024, num_heads=16, vocab_size=4096, z_channels=32,
                 patch_nums=OFFICIAL_ARCH["patch_nums"], num_classes=1000, attn_l2_norm=True, shared_aln=False,
                 norm_eps=1e-6, mlp_ratio=4.0):
        super().__init__()
        C = embed_dim
        self.depth, self.C, self.V, self.num_classes = depth, C, vocab_size, num_classes
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in patch_nums)  # 680 at 256 px
        self.first_l = patch_nums[0] ** 2
        self.scale_ends = np.cumsum([pn * pn for pn in patch_nums]).tolist()  # token index where each scale ends

        self.word_embed = nn.Linear(z_channels, C)         # f_hat feature (Cvae) -> token embedding
        self.class_emb = nn.Embedding(num_classes + 1, C)  # index num_classes is the null class of CFG
        init_std = math.sqrt(1 / C / 3)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C).normal_(0, init_std))  # the first scale's input
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C).normal_(0, init_std))          # absolute positions
        self.lvl_embed = nn.Embedding(len(patch_nums), C)                                   # which scale a token is in
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if shared_aln else nn.Identity()
        self.blocks = nn.ModuleList([AdaLNBlock(C, num_heads, mlp_ratio, norm_eps, attn_l2_norm, shared_aln) for _ in range(depth)])
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)

        # scale index of each token, and the block-causal mask: token i sees token j iff scale(j) <= scale(i)
        lvl_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])
        self.register_buffer("lvl_1L", lvl_L.view(1, self.L))
        self.register_buffer("attn_bias_for_masking", torch.where(
            lvl_L.view(-1, 1) >= lvl_L.view(1, -1), 0.0, -torch.inf).view(1, 1, self.L, self.L))

    def block_cond(self, cond_BD):
        """What the blocks are modulated with: the class embedding, or its shared 6C projection (shared_aln)."""
        return cond_BD if isinstance(self.shared_ada_lin, nn.Identity) else self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.C)

    def logits(self, h_BLC, cond_BD):
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    def forward(self, label_B, x_BLCv):
        """Teacher-forced logits of all L tokens. x_BLCv: (B, L-1, Cvae) from tokens_to_var_input. -> (B, L, V)
        Unlike the official forward, no label is dropped to the null class here: dropout belongs to pretraining."""
        B = label_B.shape[0]
        with torch.autocast(label_B.device.type, enabled=False):  # embeddings in fp32, as in the sampler
            cond_BD = self.class_emb(label_B)
            sos_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
            x_BLC = torch.cat((sos_BlC, self.word_embed(x_BLCv.float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        block_cond = self.block_cond(cond_BD)
        for block in self.blocks:
            x_BLC = block(x_BLC, block_cond, self.attn_bias_for_masking)
        return self.logits(x_BLC, cond_BD)


def build_var(arch: dict, depth: int) -> VAR:
    """VAR of the official shape at this depth: width 64*depth, one head per 64 channels."""
    keys = ("vocab_size", "z_channels", "patch_nums", "num_classes", "attn_l2_norm", "shared_aln", "norm_eps", "mlp_ratio")
    return VAR(depth=depth, embed_dim=64 * depth, num_heads=depth, **{k: arch[k] for k in keys})


def build_vae(arch: dict) -> VQVAE:
    keys = ("vocab_size", "z_channels", "ch", "patch_nums", "quant_resi", "share_quant_resi")
    return VQVAE(**{k: arch[k] for k in keys})


def load_models(cfg: Config, device: torch.device):
    """(vae, var): the official weights for --depth, or small random models for --tiny."""
    if cfg.tiny:
        torch.manual_seed(cfg.seed)
        return build_vae(TINY_ARCH).to(device), build_var(TINY_ARCH, TINY_DEPTH).to(device)
    vae_path = weight_path(cfg.vae_ckpt, VAR_URL + VAE_FILE, cfg)
    var_path = weight_path(cfg.var_ckpt, VAR_URL + f"var_d{cfg.depth}.pth", cfg)
    with torch.device("meta"):  # no random init of 300M+ parameters only to overwrite them
        vae, var = build_vae(OFFICIAL_ARCH), build_var(OFFICIAL_ARCH, cfg.depth)
    return load_weights(vae, vae_path).to(device), load_weights(var, var_path).to(device)


# ----------------------------------------------------------------------------------------------------------
# Sampling (official autoregressive_infer_cfg): one forward pass per scale, 10 at 256 px. Each pass feeds only
# the new scale's tokens; the keys/values of coarser scales come from the KV cache, which is what makes the
# block-causal mask unnecessary here. Conditional and null-class halves run as one batch of 2B for CFG.
# ----------------------------------------------------------------------------------------------------------

def cfg_ramp(cfg: float, num_scales: int) -> List[float]:
    """Guidance strength per scale: 0 at the first scale, cfg at the last (the official linear ramp)."""
    return [cfg * si / (num_scales - 1) for si in range(num_scales)]


def filter_top_k_top_p(logits_BlV, top_k: int = 0, top_p: float = 0.0):
    """Set to -inf every logit outside the top-k, and outside the smallest set holding top_p of the probability.
    Same rule as the official sample_with_top_k_top_p_, not in place."""
    if top_k > 0:
        kth_BlV = logits_BlV.topk(top_k, dim=-1, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_BlV, -torch.inf)
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1)
        drop_sorted = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[..., -1:] = False  # always keep the most likely token
        logits_BlV = logits_BlV.masked_fill(drop_sorted.scatter(-1, order_BlV, drop_sorted), -torch.inf)
    return logits_BlV


@dataclass
class Sample:
    tokens: List[torch.Tensor]          # K token maps (B, pn*pn), coarse to fine
    image: torch.Tensor                 # (B, 3, H, W) in [0, 1]
    logprob: Optional[torch.Tensor]     # (B, L): log-prob of each sampled token under the distribution it was drawn from


@torch.no_grad()
def sample(var: VAR, vae: VQVAE, label_B, cfg: float = 1.5, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 0.0, generator: Optional[torch.Generator] = None, return_logprobs: bool = False) -> Sample:
    """Draw B images of classes label_B; with return_logprobs also each token's exact log-probability."""
    B, device = label_B.shape[0], label_B.device
    quant, S = vae.quantize, len(var.patch_nums)
    ramp = cfg_ramp(cfg, S)
    cond_2BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes))))
    block_cond = var.block_cond(cond_2BD)
    lvl_pos_1LC = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    x_2BlC = cond_2BD.unsqueeze(1) + var.pos_start + lvl_pos_1LC[:, :var.first_l]
    f_hat_BChw = torch.zeros(B, quant.embedding.embedding_dim, var.patch_nums[-1], var.patch_nums[-1], device=device)
    kv_caches = [[] for _ in var.blocks]
    tokens, logprobs = [], []
    for si, pn in enumerate(var.patch_nums):
        with autocast(device):
            h_2BlC = x_2BlC
            for block, cache in zip(var.blocks, kv_caches):
                h_2BlC = block(h_2BlC, block_cond, None, cache)
            logits_2BlV = var.logits(h_2BlC, cond_2BD)
        t = ramp[si]
        logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
        if temperature != 1.0:
            logits_BlV = logits_BlV / temperature
        logits_BlV = filter_top_k_top_p(logits_BlV, top_k, top_p)
        idx_Bl = torch.multinomial(logits_BlV.softmax(dim=-1).view(-1, var.V), 1, generator=generator).view(B, pn * pn)
        if return_logprobs:
            logprobs.append(logits_BlV.log_softmax(dim=-1).gather(-1, idx_Bl.unsqueeze(-1)).squeeze(-1))
        tokens.append(idx_Bl)
        quant.add_scale(f_hat_BChw, si, idx_Bl)
        if si < S - 1:
            end = var.scale_ends[si]
            x_BlC = var.word_embed(quant.next_scale_input(f_hat_BChw, si)) + lvl_pos_1LC[:, end:end + var.patch_nums[si + 1] ** 2]
            x_2BlC = x_BlC.repeat(2, 1, 1)
    with autocast(device):
        image = vae.fhat_to_img(f_hat_BChw).float().add_(1).mul_(0.5)
    return Sample(tokens, image, torch.cat(logprobs, dim=1) if return_logprobs else None)


# ----------------------------------------------------------------------------------------------------------
# Benchmark: sampling images/s, teacher-forced tokens/s and peak memory, random weights, any depth and device.
# ----------------------------------------------------------------------------------------------------------

def benchmark(cfg: Config, repeats: int = 3) -> dict:
    device = resolve_device(cfg.device)
    arch = TINY_ARCH if cfg.tiny else OFFICIAL_ARCH
    depth = TINY_DEPTH if cfg.tiny else cfg.depth
    torch.manual_seed(cfg.seed)
    vae, var = build_vae(arch).to(device), build_var(arch, depth).to(device).eval()
    B = cfg.bench_batch
    labels = torch.arange(B, device=device) % arch["num_classes"]
    gen = torch.Generator(device).manual_seed(cfg.seed)

    def timed(fn):
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device); torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / repeats, out

    t_sample, s = timed(lambda: sample(var, vae, labels, cfg=1.5, top_k=min(900, var.V), top_p=0.96, generator=gen))
    x_BLCv = vae.quantize.tokens_to_var_input(s.tokens)

    def teacher_forced():
        with torch.no_grad(), autocast(device):
            return var(labels, x_BLCv)
    t_tf, _ = timed(teacher_forced)
    result = dict(depth=depth, device=str(device), batch=B, sample_images_per_s=B / t_sample, sample_s=t_sample,
                  teacher_forced_tokens_per_s=B * var.L / t_tf, teacher_forced_s=t_tf,
                  peak_gpu_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None):
    cfg = parse_config(argv)
    if cfg.bench:
        return benchmark(cfg)
    raise SystemExit("training is not implemented yet: use --bench")


if __name__ == "__main__":
    main()
