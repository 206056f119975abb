"""
var_grpo.py -- fine-tune a next-scale Visual AutoRegressive model (VAR) with GRPO, in one file.

Reference implementation of "Fine-Tuning Next-Scale Visual Autoregressive Models with Group Relative Policy
Optimization" (arXiv 2505.23331) on top of VAR (Tian et al. 2024, FoundationVision/VAR, MIT). The tokenizer and the
transformer below load the official checkpoints (vae_ch160v4096z32.pth, var_d{16,20,24,30}.pth) unchanged and
reproduce the official outputs number for number.

The model (VAR paper, arXiv 2404.02905, sec. 3)
  1. Tokenizer. A CNN encoder maps an image to a latent f (Cv x h x w, 32 x 16 x 16 at 256 px). Residual
     quantisation over K scales (h_k = 1,2,3,4,5,6,8,10,13,16) turns f into K token maps r_1..r_K:
       for k = 1..K:  r_k = argmin_v || area_down(f - f_hat, h_k) - e_v ||        (nearest codebook entry)
                      f_hat += phi_k( bicubic_up(e[r_k], h) )                      (phi_k: a 3x3 conv, mixed 50/50)
     The decoder maps f_hat back to pixels. 680 tokens in all at 256 px, vocabulary V = 4096.
  2. Transformer. A GPT-style decoder with adaptive layer norm on the class label c predicts every token of scale k
     at once, from f_hat after k-1 scales area-downsampled to h_k x h_k; a block-causal mask hides finer scales:
       p(r_1, ..., r_K | c) = prod_k p(r_k | r_<k, c),   p(r_k | r_<k, c) = prod_{i in scale k} p(r_k,i | r_<k, c)
  3. Sampling: K forward passes (one per scale) with a KV cache and classifier-free guidance ramped over scales:
       z_k = (1 + s_k) z_k(c) - s_k z_k(null),   s_k = cfg * (k-1)/(K-1)          (z_k: the logits of scale k)
     then temperature and a multinomial draw from the image's own generator, seeded by a key such as (seed, step,
     image): an image depends on its class and key alone, not on the batch it is drawn in.

The fine-tuning (GRPO, Shao et al. 2024, as used in the paper)
  4. The policy pi_theta is VAR given an ImageNet class c; the text prompt enters only through the reward. Each step
     draws P classes and samples a group of G images per class (P*G images) with pi_old = pi_theta.
  5. Reward R(x) = sum_j lambda_j R_j(x): CLIP cosine similarity to the prompt and the LAION aesthetic score, both
     from one CLIP forward pass (in the toy world of --tiny: a toy CLIP and a toy aesthetic head; or pixel statistics).
  6. Group-relative advantage, one per image:  A_i = (R_i - mean_group(R)) / (std_group(R) + eps).
  7. Per token t of image i, with rho_t = exp(log pi_theta(a_t) - log pi_old(a_t)) under the guided, temperature-scaled
     distribution of §3 (the one a_t was drawn from), the loss J:
       J_i = sum_t w_t [ -min(rho_t A_i, clip(rho_t, 1-eps_clip, 1+eps_clip) A_i) + beta * KL_t ],   J = mean_i J_i
       KL_t = exp(q_t) - q_t - 1,  q_t = log pi_ref(a_t) - log pi_theta(a_t)    (k3 estimator, pi_ref frozen at start)
     By default every token of an image weighs the same, w_t = 1/L; log pi_old is what the sampler recorded.
  8. --inner-epochs passes of AdamW over --minibatches minibatches of the P*G samples, on all weights (pi_ref: a frozen
     copy) or on LoRA adapters (pi_ref: the adapters off); then back to 4. At the end, fresh samples of the starting
     and the final policy (same classes and seeds) measure what changed (summary.json).

The toy world (--tiny): the same code on a CPU, with a VQ-VAE, a VAR-d2, a CLIP and an aesthetic head trained from
scratch on 32 px images of coloured shapes (notebooks/toy_world.py; weights in notebooks/toy/). VAR saw 8 colours,
CLIP 11; the prompt "a lime shape" makes VAR draw a colour its pretraining never showed it, as in the paper.

Notation, one meaning per symbol. Shapes are written in names (logits_BLV) or in trailing comments:
  B      images in a batch (2B: the batch twice, with its classes and with the null class, for guidance)
  P      classes drawn per step
  G      images per class in a step: a group
  K      scales (k = 1..K in the equations; the code's si = k - 1 counts from 0)
  L      tokens of all scales (680)
  l      tokens of one scale (l_k = h_k * h_k)
  h_k    the side of scale k's token map (pn in the code, from patch_nums)
  M      teacher-forced input positions: L minus the first scale's
  C      the transformer's width (64 * depth)
  nh     attention heads
  dh     the width of one head (C / nh)
  V      vocabulary (4096)
  Cv     the latent's channels (Cvae, 32)
  h, w   the latent's height and width (16 x 16)
  H, W   an image's height and width in pixels
  D      the width of a CLIP embedding (768)
  c      a class label
  t      a token
  r_k    scale k's token map
  R      a reward; lambda_j the weight of its component R_j
  A      an advantage
  rho    the probability ratio pi_theta / pi_old
  w_t    a token's weight in the loss
  s_k    the guidance of scale k
  z      logits
  J      the loss
  beta   the weight of the KL term
  q_t    log pi_ref - log pi_theta of a token (inside the k3 KL)
  The official checkpoints' key names keep their own letters (scale_mul_1H11: H heads; ema_vocab_hit_SV: S scales).

Where this differs from the papers and the official code: beyond its abstract, the GRPO paper's text was not
available to us, so every default (learning rate, beta, clip range, group size, steps, reward weights) is this
project's choice; VAR.forward drops no class labels; only the released checkpoints' attention is implemented.

Reading order: Config | Tokenizer (§1) | Transformer (§2) | Sampling (§3) | Rewards (§5) | GRPO (§6-7) | The policy
(§8) | The training loop (§4-8) | main. Then an APPENDIX of plumbing that changes nothing the method computes; "step"
always means a training step (one pass of §4-8), "§k" the k-th item above.
"""
from __future__ import annotations

import copy
import hashlib
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------------------
# Config: the method's settings, one field each, its --help the string under it (how and where a run executes is
# RunConfig, appendix B). Then the architecture of the official checkpoints and of the toy world.
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Config:
    depth: int = 16
    """VAR depth: 16, 20, 24 or 30 (official checkpoint var_d{depth}.pth; width = 64*depth)"""
    tiny: bool = False
    """the toy world on CPU: VAR-d2, CLIP and aesthetic head trained on 32 px coloured shapes (notebooks/toy/)"""
    seed: int = 0
    """seed of every random stream (sampling, class draws, initialisation)"""
    prompt: str = "ukiyo-e painting"
    """text the CLIP reward pulls the images towards"""
    reward: str = "clip=1,aesthetic=0.05"
    """reward components and weights, name=weight,...: clip, aesthetic, in the toy world redness, area; module:function (your own)"""
    clip_model: str = "ViT-L-14-quickgelu"
    """open_clip model name; the OpenAI weights need the -quickgelu variant (--tiny: always the toy CLIP)"""
    cfg: float = 1.5
    """classifier-free guidance strength, ramped linearly over scales from 0 to cfg (1.5: the official FID setting)"""
    temperature: float = 1.0
    """sampling temperature applied to the guided logits, in rollouts and in the policy's log-probabilities alike"""
    steps: int = 300
    """GRPO steps (each: sample P*G images, score them, update the policy)"""
    classes: str = ""
    """comma-separated ImageNet class ids to draw from (e.g. 207,360,980); empty: all classes"""
    classes_per_step: int = 4
    """P: class labels drawn per step"""
    group_size: int = 8
    """G: images sampled per class label; advantages are computed within each such group"""
    lr: float = 1e-5
    """AdamW learning rate of full fine-tuning (--tiny: 2e-4)"""
    lora_lr: float = 1e-4
    """AdamW learning rate of LoRA adapters (--lora-rank > 0): they start at zero, so they want more (--tiny: 3e-3)"""
    weight_decay: float = 0.0
    """AdamW weight decay (0: decaying towards zero would pull away from the pretrained weights; the KL term regularises)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    clip_eps: float = 0.2
    """epsilon of the clipped surrogate: rho is clipped to [1 - eps, 1 + eps]"""
    beta: float = 0.01
    """weight of the k3 KL penalty towards the starting model (0: no reference copy is kept)"""
    adv_eps: float = 1e-4
    """added to the reward std before dividing"""
    adv_norm: str = "group"
    """what R_i - mean_group is divided by: group (its std + eps, GRPO), batch (the batch's std + eps), none (Dr. GRPO)"""
    old_logprobs: str = "sampler"
    """log pi_old: sampler (recorded while sampling) or recompute (a teacher-forced pass: no bf16 gap on a GPU)"""
    token_weight: str = "token"
    """how an image's loss averages over its tokens: token (each equally: w_t = 1/L) or scale (each scale equally)"""
    inner_epochs: int = 1
    """passes over each step's P*G samples"""
    minibatches: int = 2
    """optimizer steps per inner epoch; the P*G samples are split into this many minibatches"""
    lora_rank: int = 0
    """> 0: train LoRA adapters of this rank on the blocks' linears (at --lora-lr), pi_ref = adapters off; 0: all weights"""


# --tiny changes these defaults (flags given explicitly still win): the paper's claim on a CPU in about a minute, the
# prompt "a lime shape" (a colour the toy VAR never saw). The README gives the measurements they were chosen by.
TINY_DEFAULTS = dict(device="cpu", prompt="a lime shape", steps=200, classes_per_step=2, group_size=8, beta=0.05,
                     lr=2e-4, lora_lr=3e-3, num_eval=20, minibatches=2, micro_batch=8, eval_every=50, save_every=100)

# The architecture of the official checkpoints (FoundationVision/VAR models/__init__.py: build_vae_var).
# width = 64 * depth and heads = depth for every official depth; --tiny swaps in TOY_ARCH.
OFFICIAL_ARCH = dict(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, quant_resi=0.5,
                     patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), num_classes=1000, norm_eps=1e-6, mlp_ratio=4.0)
# The toy world of --tiny (notebooks/toy_world.py): 32 px images of 10 shapes, a VQ-VAE with 4x downsampling
# (8 x 8 latent, 4 scales, 85 tokens, V = 256) and VAR-d2, pretrained on a CPU; the weights ship in notebooks/toy/.
TOY_ARCH = dict(OFFICIAL_ARCH, vocab_size=256, z_channels=16, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=4,
                patch_nums=(1, 2, 4, 8), num_classes=10)
TOY_DEPTH = 2


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, §1: the multi-scale residual VQ-VAE (VAR paper sec. 3.2, Algorithms 1-2; official models/vqvae.py,
# quant.py). Its new idea is the quantiser: it explains the latent f as a sum of K token maps of growing resolution,
# each quantising what the coarser ones left unexplained. The encoder and decoder around it are the standard
# VQGAN/LDM CNN, in appendix G. Module names follow the official ones so that the checkpoint loads unchanged.
# ----------------------------------------------------------------------------------------------------------

class Phi(nn.Conv2d):
    """phi_k of the paper: f -> (1 - mix) f + mix conv3x3(f). It repairs the blur of upsampling a coarse token map."""
    def __init__(self, channels: int, mix: float):
        super().__init__(channels, channels, 3, padding=1)
        self.mix = abs(mix)

    def forward(self, f_BCvhw):
        return f_BCvhw * (1 - self.mix) + super().forward(f_BCvhw) * self.mix


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
        # share_quant_resi convolutions phi shared across the K scales: scale si uses the one whose tick is nearest
        # to si/(K-1). (The official code has two other layouts, which no released checkpoint uses.)
        n_phi, K = share_quant_resi, len(patch_nums)
        self.quant_resi = nn.Module()
        self.quant_resi.qresi_ls = nn.ModuleList([Phi(z_channels, quant_resi) for _ in range(n_phi)])
        third = 1 / 3 if n_phi == 4 else 1 / 2  # the official ticks
        ticks = np.linspace(third / n_phi, 1 - third / n_phi, n_phi)
        self.phi_of_scale = [self.quant_resi.qresi_ls[int(np.argmin(np.abs(ticks - si / (K - 1))))] for si in range(K)]  # no new keys

    def scale_contribution(self, si: int, idx_Bl):
        """phi_si(upsample(e[r_si])): what scale si's token map adds to f_hat. (B, Cv, h, w)"""
        B, pn, h = idx_Bl.shape[0], self.patch_nums[si], self.patch_nums[-1]
        e_BCvhw = self.embedding(idx_Bl).transpose(1, 2).reshape(B, -1, pn, pn)
        if pn != h:
            e_BCvhw = F.interpolate(e_BCvhw, size=(h, h), mode="bicubic")
        return self.phi_of_scale[si](e_BCvhw)

    def add_scale(self, f_hat_BCvhw, si: int, idx_Bl):
        """f_hat += scale si's contribution (in place): the running reconstruction after scale si."""
        return f_hat_BCvhw.add_(self.scale_contribution(si, idx_Bl))

    def next_scale_input(self, f_hat_BCvhw, si: int):
        """The transformer's input for scale si+1: f_hat so far, area-downsampled to that scale. (B, pn*pn, Cv)"""
        pn = self.patch_nums[si + 1]
        return F.interpolate(f_hat_BCvhw, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    @torch.no_grad()
    def nearest_tokens(self, f_rest_BCvhw, si: int):
        """r_si = argmin_v || area_down(f_rest, h_si) - e_v ||: the codebook entry nearest to each cell. (B, pn*pn)"""
        B, Cv, h, w = f_rest_BCvhw.shape
        pn, e_VCv = self.patch_nums[si], self.embedding.weight
        cells = (F.interpolate(f_rest_BCvhw, size=(pn, pn), mode="area") if pn != h else f_rest_BCvhw).permute(0, 2, 3, 1).reshape(-1, Cv)  # (B*pn*pn, Cv)
        # squared distances |cell|^2 + |e|^2 - 2 cell.e, in the official order of operations (exact argmin ties)
        distances = (cells.square().sum(1, keepdim=True) + e_VCv.square().sum(1)).addmm_(cells, e_VCv.T, alpha=-2)  # (B*pn*pn, V)
        return distances.argmin(dim=1).view(B, pn * pn)

    def f_to_tokens(self, f_BCvhw) -> List[torch.Tensor]:
        """Encode a latent into K token maps, coarse to fine (official f_to_idxBl_or_fhat)."""
        f_rest, tokens = f_BCvhw.clone(), []
        for si in range(len(self.patch_nums)):
            idx_Bl = self.nearest_tokens(f_rest, si)
            tokens.append(idx_Bl)
            f_rest.sub_(self.scale_contribution(si, idx_Bl))  # what the finer scales must still explain
        return tokens

    def tokens_to_fhat(self, tokens: List[torch.Tensor]):
        """f_hat = sum_k phi_k(upsample(e[r_k])): the latent the decoder turns into pixels (official embed_to_fhat)."""
        h = self.patch_nums[-1]
        f_hat = torch.zeros(tokens[0].shape[0], self.embedding.embedding_dim, h, h, device=tokens[0].device)
        for si, idx_Bl in enumerate(tokens):
            self.add_scale(f_hat, si, idx_Bl)
        return f_hat

    def tokens_to_var_input(self, tokens: List[torch.Tensor]):
        """Teacher-forcing input: for every scale after the first, f_hat of the coarser scales at that scale's
        resolution, concatenated. (B, M, Cv) (official idxBl_to_var_input)"""
        h = self.patch_nums[-1]
        f_hat = torch.zeros(tokens[0].shape[0], self.embedding.embedding_dim, h, h, device=tokens[0].device)
        inputs = []
        for si in range(len(self.patch_nums) - 1):
            self.add_scale(f_hat, si, tokens[si])
            inputs.append(self.next_scale_input(f_hat, si))
        return torch.cat(inputs, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Transformer, §2: VAR (VAR paper sec. 3.2 and 4, official models/var.py, basic_var.py). A GPT-2-like decoder
# whose layer norms are modulated by the class embedding (AdaLN), run over the 680 tokens of all scales at once. Its
# block-causal mask lets a token of scale k see the tokens of scales <= k, never a finer one.
# ----------------------------------------------------------------------------------------------------------

class KVCache:
    """Sampling: the attention keys and values of the tokens drawn so far, in buffers allocated once for all L tokens
    (no copy per scale). `start` is where the current scale's tokens go."""
    def __init__(self, L: int):
        self.L, self.start, self.keys, self.values = L, 0, None, None  # keys, values: (2B, nh, L, dh)

    def write(self, key_new, value_new):
        """Store this scale's keys and values (2B, nh, l, dh); return those of every scale so far (2B, nh, start + l, dh)."""
        if self.keys is None:
            self.keys = key_new.new_empty(*key_new.shape[:2], self.L, key_new.shape[3])
            self.values = torch.empty_like(self.keys)
        end = self.start + key_new.shape[2]
        self.keys[:, :, self.start:end], self.values[:, :, self.start:end] = key_new, value_new
        return self.keys[:, :, :end], self.values[:, :, :end]


class QKVLinear(nn.Linear):
    """The query, key and value projection. Its biases are the attention's parameters (official keys q_bias, v_bias;
    keys get none), passed in, so that the bias is added inside the matmul exactly as in the official code."""
    def forward(self, x, bias_3C):
        return F.linear(x, self.weight, bias_3C)


class SelfAttention(nn.Module):
    """Cosine attention (the official attn_l2_norm=True, which every released checkpoint uses): queries and keys are
    L2-normalised and the queries scaled by a learned per-head temperature, capped at 100, instead of 1/sqrt(dh)."""
    def __init__(self, C: int, nh: int):
        super().__init__()
        self.nh, self.dh = nh, C // nh
        self.mat_qkv = QKVLinear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))  # keys get no bias; stored in the official checkpoint
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, nh, 1, 1), 4.0).log())  # (1, nh, 1, 1): log temperature
        self.proj = nn.Linear(C, C)

    def forward(self, x, attn_bias=None, kv_cache: Optional[KVCache] = None):
        """x: (batch, length, C): (2B, L, C) in a teacher-forced pass, (2B, l, C) per scale when sampling."""
        batch, length, C = x.shape
        qkv = self.mat_qkv(x, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        query, key, value = qkv.view(batch, length, 3, self.nh, self.dh).permute(2, 0, 3, 1, 4).unbind(0)  # (batch, nh, length, dh)
        query = F.normalize(query, dim=-1).mul(self.scale_mul_1H11.clamp_max(math.log(100)).exp())
        key = F.normalize(key, dim=-1)
        if kv_cache is not None:  # sampling: scale k attends to the cached keys/values of scales < k, and its own
            key, value = kv_cache.write(key, value)
        if attn_bias is not None:
            attn_bias = attn_bias.to(value.dtype)
        out = F.scaled_dot_product_attention(query.to(value.dtype), key.to(value.dtype), value, attn_mask=attn_bias, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(batch, length, C))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """x += gamma1 * attn(LN(x)(1 + gain1) + shift1);  x += gamma2 * ffn(LN(x)(1 + gain2) + shift2), with the six
    modulation vectors computed from the class embedding (official AdaLNSelfAttn, which calls the gains "scale")."""
    def __init__(self, C: int, nh: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.C = C
        self.attn = SelfAttention(C, nh)
        self.ffn = FFN(C, round(C * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, cond_BC, attn_bias=None, kv_cache=None):
        mod = self.ada_lin(cond_BC).view(-1, 1, 6, self.C)
        gamma1, gamma2, gain1, gain2, shift1, shift2 = mod.unbind(2)  # each (B, 1, C)
        x = x + self.attn(self.ln_wo_grad(x).mul(gain1.add(1)).add_(shift1), attn_bias, kv_cache).mul_(gamma1)
        return x + self.ffn(self.ln_wo_grad(x).mul(gain2.add(1)).add_(shift2)).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond_BC):
        gain, shift = self.ada_lin(cond_BC).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(gain.add(1)).add_(shift)


class VAR(nn.Module):
    def __init__(self, depth=16, embed_dim=1024, num_heads=16, vocab_size=4096, z_channels=32,
                 patch_nums=OFFICIAL_ARCH["patch_nums"], num_classes=1000, norm_eps=1e-6, mlp_ratio=4.0):
        super().__init__()
        C = embed_dim
        self.depth, self.C, self.V, self.num_classes = depth, C, vocab_size, num_classes
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in patch_nums)  # 680 at 256 px
        self.first_l = patch_nums[0] ** 2
        self.scale_ends = np.cumsum([pn * pn for pn in patch_nums]).tolist()  # token index where each scale ends

        self.word_embed = nn.Linear(z_channels, C)         # f_hat feature (Cv) -> token embedding
        self.class_emb = nn.Embedding(num_classes + 1, C)  # index num_classes is the null class of CFG
        init_std = math.sqrt(1 / C / 3)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C).normal_(0, init_std))  # the first scale's input
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C).normal_(0, init_std))          # absolute positions
        self.lvl_embed = nn.Embedding(len(patch_nums), C)                                   # which scale a token is in
        self.blocks = nn.ModuleList([AdaLNBlock(C, num_heads, mlp_ratio, norm_eps) for _ in range(depth)])
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self.grad_checkpointing = False  # --grad-checkpointing (appendix E): forward reads it

        # scale index of each token, and the block-causal mask: token i sees token j iff scale(j) <= scale(i)
        lvl_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])
        self.register_buffer("lvl_1L", lvl_L.view(1, self.L))
        self.register_buffer("attn_bias_for_masking", torch.where(
            lvl_L.view(-1, 1) >= lvl_L.view(1, -1), 0.0, -torch.inf).view(1, 1, self.L, self.L))

    def token_inputs(self, cond_BC, f_BlCv, start: int):
        """The transformer's inputs for l tokens from index `start` on (all L, or one scale's when sampling), the one
        place they are built: at start 0 the first scale's start token (class embedding cond_BC + pos_start), then the
        f_hat features f_BlCv through word_embed, each plus its position and scale embeddings, in fp32. (B, l, C)"""
        with torch.autocast(self.pos_1LC.device.type, enabled=False):
            parts = [cond_BC.unsqueeze(1) + self.pos_start] if start == 0 else []
            if f_BlCv is not None:
                parts.append(self.word_embed(f_BlCv.float()))
            x_BlC = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            B, end = x_BlC.shape[0], start + x_BlC.shape[1]
            return x_BlC + (self.lvl_embed(self.lvl_1L[:, start:end].expand(B, -1)) + self.pos_1LC[:, start:end])

    def logits(self, x, cond_BC):
        return self.head(self.head_nm(x.float(), cond_BC).float()).float()

    def scale_logits(self, x_2BlC, cond_2BC, kv_caches: List[KVCache], si: int):
        """Sampling: the logits of scale si's tokens from their inputs; the coarser scales' keys and values come from
        kv_caches, and this scale's are added to them. (2B, l, V)"""
        for block, cache in zip(self.blocks, kv_caches):
            cache.start = self.scale_ends[si - 1] if si else 0
            x_2BlC = block(x_2BlC, cond_2BC, None, cache)
        return self.logits(x_2BlC, cond_2BC)

    def forward(self, label_B, f_BMCv):
        """Teacher-forced logits of all L tokens. f_BMCv: (B, M, Cv) from tokens_to_var_input. -> (B, L, V)
        Unlike the official forward, no label is dropped to the null class here: dropout belongs to pretraining."""
        with torch.autocast(label_B.device.type, enabled=False):  # embeddings in fp32, as in the sampler
            cond_BC = self.class_emb(label_B)
        x_BLC = self.token_inputs(cond_BC, f_BMCv, 0)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():  # recompute its activations in the backward pass
                x_BLC = checkpoint(block, x_BLC, cond_BC, self.attn_bias_for_masking, use_reentrant=False)
            else:
                x_BLC = block(x_BLC, cond_BC, self.attn_bias_for_masking)
        return self.logits(x_BLC, cond_BC)


# ----------------------------------------------------------------------------------------------------------
# Sampling, §3 (official autoregressive_infer_cfg): one forward pass per scale, 10 at 256 px. Each pass feeds
# only the new scale's tokens; the keys/values of coarser scales come from the KV cache, which is what makes the
# block-causal mask unnecessary here. Conditional and null-class halves run as one batch of 2B for CFG.
# ----------------------------------------------------------------------------------------------------------

def cfg_ramp(cfg: float, num_scales: int) -> List[float]:
    """Guidance s_k per scale: 0 at the first scale, cfg at the last (the official linear ramp)."""
    return [cfg * si / (num_scales - 1) for si in range(num_scales)]


def guidance_per_token(var: VAR, cfg: float):
    """s_k of each token's scale, as a column to multiply logits by. (L, 1), float64: see guide"""
    ramp = torch.tensor(cfg_ramp(cfg, len(var.patch_nums)), dtype=torch.float64, device=var.lvl_1L.device)
    return ramp[var.lvl_1L[0]].unsqueeze(-1)


def guide(logits_2BlV, s_l1, temperature: float):
    """§3's distribution, as logits: z = ((1 + s) z(c) - s z(null)) / temperature, from the logits of both CFG
    branches (the B rows of the classes first, then the B of the null class; s_l1 None: the classes' B rows alone,
    unguided). The sampler calls it for one scale's l tokens, the teacher-forced pass (token_logprobs) for all L.
    s_l1: (l, 1) in float64, rounded to fp32 as the official code's Python floats are, so that both agree bit for bit."""
    if s_l1 is None:
        z_BlV = logits_2BlV
    else:
        B = len(logits_2BlV) // 2
        z_BlV = (1 + s_l1).float() * logits_2BlV[:B] - s_l1.float() * logits_2BlV[B:]
    return z_BlV if temperature == 1.0 else z_BlV / temperature


def seed_of(*key) -> int:
    """The seed of one random draw, named by its key, e.g. (seed, "rollout", step, image index). Each draw has its own
    generator, so what it draws depends on its key alone: not on the draws before it or the batch it is in (appendix
    H splits a batch over processes), and a resumed run needs no saved generator state."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1  # 63 bits


def generator(*key, device="cpu") -> torch.Generator:
    """A generator seeded for the draw named by key (seed_of)."""
    return torch.Generator(device).manual_seed(seed_of(*key))


def image_seeds(n: int, *key) -> List[int]:
    """The seeds of n images drawn under one key, e.g. (seed, "rollout", step): image i's is seed_of(*key, i)."""
    return [seed_of(*key, i) for i in range(n)]


@dataclass
class Sample:
    tokens: List[torch.Tensor]           # K token maps (B, pn*pn), coarse to fine
    image: torch.Tensor                  # (B, 3, H, W) in [0, 1]
    logp_BL: Optional[torch.Tensor]      # log-prob of each drawn token under the distribution it was drawn from


@torch.no_grad()
def sample(var: VAR, vae: VQVAE, label_B, seed_B, cfg: float = 1.5, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 0.0, return_logprobs: bool = False) -> Sample:
    """Draw B images of classes label_B, image b from a generator seeded with seed_B[b] (integers, seed_of); with
    return_logprobs also each token's exact log-probability."""
    B, device = label_B.shape[0], label_B.device
    gens = [torch.Generator(device).manual_seed(int(seed)) for seed in seed_B]  # one per image: B small draws a scale
    if len(gens) != B:
        raise ValueError(f"sample: {len(gens)} seeds for {B} images")
    quant, K = vae.quantize, len(var.patch_nums)
    s_L1 = guidance_per_token(var, cfg)
    cond_2BC = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes))))
    x_2BlC = var.token_inputs(cond_2BC, None, 0)  # the first scale: the class alone
    f_hat_BCvhw = torch.zeros(B, quant.embedding.embedding_dim, var.patch_nums[-1], var.patch_nums[-1], device=device)
    kv_caches = [KVCache(var.L) for _ in var.blocks]
    tokens, logprobs = [], []
    for si, pn in enumerate(var.patch_nums):
        start = var.scale_ends[si - 1] if si else 0
        with autocast(device):  # bf16 on a GPU, as the official code runs; fp32 on a CPU (appendix E)
            logits_2BlV = var.scale_logits(x_2BlC, cond_2BC, kv_caches, si)
        # top-k / top-p (appendix C) cut the tail for evaluation images only; rollouts keep every token (0, 0)
        logits_BlV = filter_top_k_top_p(guide(logits_2BlV, s_L1[start:var.scale_ends[si]], temperature), top_k, top_p)
        probs_BlV = logits_BlV.softmax(dim=-1)
        idx_Bl = torch.stack([torch.multinomial(probs_lV, 1, generator=g)[:, 0] for probs_lV, g in zip(probs_BlV, gens)])
        if return_logprobs:
            logprobs.append(logits_BlV.log_softmax(dim=-1).gather(-1, idx_Bl.unsqueeze(-1)).squeeze(-1))
        tokens.append(idx_Bl)
        quant.add_scale(f_hat_BCvhw, si, idx_Bl)
        if si < K - 1:  # the next scale's input: f_hat so far at its resolution, the same for both CFG halves
            x_2BlC = var.token_inputs(None, quant.next_scale_input(f_hat_BCvhw, si), var.scale_ends[si]).repeat(2, 1, 1)
    with autocast(device):  # DECODE_BATCH images a pass: the decoder's full-resolution activations dominate memory
        image = torch.cat([vae.fhat_to_img(f).float() for f in f_hat_BCvhw.split(DECODE_BATCH)]).add_(1).mul_(0.5)
    return Sample(tokens, image, torch.cat(logprobs, dim=1) if return_logprobs else None)


# ----------------------------------------------------------------------------------------------------------
# Rewards, §5. A reward maps a batch of images in [0, 1] to one number per image. The text prompt enters the
# method only here: VAR stays a class-conditional model and learns to make its classes look like the prompt.
#   clip       cos(E_img(x), E_txt(prompt)), the raw cosine in [-1, 1], of OpenAI CLIP ViT-L/14 (Radford et al. 2021).
#   aesthetic  the LAION "improved aesthetic predictor": an MLP on the same, L2-normalised image embedding, ~1 to 10.
#   redness, area  the toy world's pixel statistics: how red the shape is, how much of the image it covers.
#   module:function  a reward of your own: one number per image (README, "Your own reward").
# Default weights clip=1, aesthetic=0.05: the aesthetic score spans ~4 points over LAION's rated images, a CLIP cosine
# to a style prompt a few tenths, so the prompt leads and aesthetics keep the images clean.
# ----------------------------------------------------------------------------------------------------------

REWARD_NAMES = ("clip", "aesthetic", "redness", "area")


def shape_mask(images_B3HW):
    """The toy world's silhouette: 1 where a pixel differs from the background (the median of the border pixels) by
    >= 0.25 in some channel, 0 below 0.1, linear in between (a soft edge for antialiased borders). (B, 1, H, W)"""
    x = images_B3HW.float()
    border = torch.cat((x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]), dim=-1)  # (B, 3, border pixels)
    background_B311 = border.median(dim=-1).values[..., None, None]
    distance_B1HW = (x - background_B311).abs().amax(dim=1, keepdim=True)
    return ((distance_B1HW - 0.1) / 0.15).clamp(0, 1)


def shape_redness(images_B3HW):
    """Mean of R - (G + B)/2 over the shape's pixels (weighted by shape_mask): +1 pure red, -1 pure cyan, 0 grey. (B,)"""
    mask_B1HW = shape_mask(images_B3HW)
    red, green, blue = images_B3HW.float().unbind(1)
    red_B1HW = (red - (green + blue) / 2).unsqueeze(1)
    return (mask_B1HW * red_B1HW).sum((1, 2, 3)) / mask_B1HW.sum((1, 2, 3)).clamp_min(1.0)


class Reward(nn.Module):
    """R(x) = sum_j lambda_j R_j(x). Call it on images (B, 3, H, W) in [0, 1]; it returns the total (B,), each
    component (B,), and the features (B, D) the diversity is measured on (CLIP image embeddings when CLIP ran)."""
    def __init__(self, weights: dict, clip_model=None, text_emb_D=None, aesthetic: Optional[AestheticHead] = None,
                 own: Optional[dict] = None):
        super().__init__()
        self.weights, self.clip, self.aesthetic, self.own = weights, clip_model, aesthetic, own or {}
        self.register_buffer("text_emb_D", text_emb_D)  # the prompt, encoded once

    @torch.no_grad()
    def forward(self, images_B3HW):
        parts, features_BD = {}, None
        if self.clip is not None:
            with autocast(images_B3HW.device):  # bf16 on a GPU: 4x faster on an H200, cosines within 1e-3 of fp32
                # clip_input (appendix A): resized, cropped and normalised as this CLIP's own preprocessing would
                features_BD = F.normalize(self.clip.encode_image(clip_input(self.clip, images_B3HW)).float(), dim=-1)
            if "clip" in self.weights:
                parts["clip"] = features_BD @ self.text_emb_D
            if "aesthetic" in self.weights:
                parts["aesthetic"] = self.aesthetic(features_BD)
        if "redness" in self.weights:
            parts["redness"] = shape_redness(images_B3HW)
        if "area" in self.weights:
            parts["area"] = shape_mask(images_B3HW).mean((1, 2, 3))
        for name, reward_of in self.own.items():  # a reward of your own, as a (B,) tensor (appendix A: own_reward)
            parts[name] = reward_of(images_B3HW)
        if features_BD is None:  # no CLIP: measure diversity on an 8x8 thumbnail, centred on grey
            features_BD = (F.adaptive_avg_pool2d(images_B3HW.float(), 8) - 0.5).flatten(1)
        total_B = sum(self.weights[name] * part_B for name, part_B in parts.items())
        for name, part_B in {**parts, "weighted": total_B}.items():
            if not torch.isfinite(part_B).all():
                raise FloatingPointError(f"the {name} reward is not finite for {(~torch.isfinite(part_B)).sum().item()} "
                                         f"image(s); " + ("check what computes it and its inputs" if name in parts
                                         else f"the weights {self.weights} overflow float32: make them smaller"))
        return total_B, parts, features_BD


# ----------------------------------------------------------------------------------------------------------
# GRPO, §6-7: advantages within groups, and the clipped surrogate with the KL penalty per token. An image's probability
# is the product over its 680 tokens of the sampler's distributions; token_logprobs recomputes them with gradients.
# ----------------------------------------------------------------------------------------------------------

def group_advantages(reward_B, group_size: int, eps: float, norm: str = "group"):
    """A_i = (R_i - mean_group) / (std + eps), std with Bessel's correction as in the GRPO paper's code: of the group
    (norm="group"), of the batch ("batch"), or none ("none", Dr. GRPO). Equal rewards: exactly 0, never NaN."""
    reward_PG = reward_B.view(-1, group_size)  # a row per group; an equal row's float32 mean can be 1 ulp off it, so:
    diff_PG = (reward_PG - reward_PG.mean(1, keepdim=True)) * (reward_PG != reward_PG[:, :1]).any(1, keepdim=True)
    if norm == "none":
        return diff_PG.view(-1)
    std = reward_PG.std(1, keepdim=True) if norm == "group" else reward_B.std()
    return torch.where(std > 0, diff_PG / (std + eps), 0.0).view(-1)  # explicit 0, also when eps = 0


def grpo_loss(logp_BL, logp_old_BL, adv_B, logp_ref_BL: Optional[torch.Tensor], clip_eps: float, beta: float,
              weight_L: Optional[torch.Tensor] = None):
    """J: GRPO's clipped surrogate plus beta * k3 KL, per token; averaged over an image's tokens with weights w_t =
    weight_L (summing to 1; None: the plain mean), then over images. Returns J and a dict of diagnostics (floats):
    kl_ref, the k3 KL to pi_ref (the penalty's), and kl_old, the k3 KL between pi_old and pi_theta (how far the
    updates moved the policy since sampling), both averaged as J is; over all tokens, ratio_mean and clip_frac, and
    the largest and the mean |log rho| (log_ratio_max, log_ratio_mean)."""
    log_ratio_BL = logp_BL - logp_old_BL
    ratio_BL = log_ratio_BL.exp()
    adv_B1 = adv_B.unsqueeze(1)
    surrogate_BL = -torch.min(ratio_BL * adv_B1, ratio_BL.clamp(1 - clip_eps, 1 + clip_eps) * adv_B1)
    per_token_BL = surrogate_BL
    kl_BL = torch.zeros_like(logp_BL)
    if beta > 0:
        q_BL = logp_ref_BL - logp_BL
        kl_BL = q_BL.exp() - q_BL - 1  # k3: unbiased, always >= 0 (Schulman 2020)
        per_token_BL = per_token_BL + beta * kl_BL
    average = (lambda x_BL: x_BL.mean(1).mean(0)) if weight_L is None else (lambda x_BL: (x_BL * weight_L).sum(1).mean(0))
    loss = average(per_token_BL)
    with torch.no_grad():
        stats = dict(kl_ref=average(kl_BL).item(), kl_old=average((ratio_BL - 1) - log_ratio_BL).item(),
                     ratio_mean=ratio_BL.mean().item(), clip_frac=((ratio_BL - 1).abs() > clip_eps).float().mean().item(),
                     policy_loss=average(surrogate_BL).item(), kl_loss=beta * average(kl_BL).item(),
                     log_ratio_max=log_ratio_BL.abs().max().item(), log_ratio_mean=log_ratio_BL.abs().mean().item())
    return loss, stats


def token_logprobs(var: VAR, vae: VQVAE, label_B, tokens: List[torch.Tensor], cfg: float, temperature: float,
                   entropy: bool = False):
    """log pi(a_t | a_<t, c) of every token of the given pyramids, under the guided distribution of `sample`. (B, L)
    With entropy=True also the entropy of each of those distributions, without gradient: ((B, L), (B, L))."""
    with torch.no_grad():
        f_BMCv = vae.quantize.tokens_to_var_input(tokens)
    tokens_BL = torch.cat(tokens, dim=1)
    with autocast(label_B.device):
        if cfg == 0:  # no guidance: the null-class branch would be multiplied by 0, so don't compute it
            logits_BLV = guide(var(label_B, f_BMCv), None, temperature)
        else:
            logits_2BLV = var(torch.cat((label_B, torch.full_like(label_B, var.num_classes))), f_BMCv.repeat(2, 1, 1))
            logits_BLV = guide(logits_2BLV, guidance_per_token(var, cfg), temperature)
    logp_BLV = logits_BLV.float().log_softmax(-1)
    logp_BL = logp_BLV.gather(-1, tokens_BL.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logp_BL
    with torch.no_grad():
        return logp_BL, -(logp_BLV.exp() * logp_BLV).sum(-1)


def scale_token_weights(var: VAR):
    """--token-weight scale: w_t = 1/(K l_k) for a token of scale k, which has l_k tokens, so that each of the K
    scales weighs 1/K of an image's loss (the default weighs each token 1/L). Sums to 1. (L,)"""
    l_k = torch.tensor([pn * pn for pn in var.patch_nums], device=var.lvl_1L.device)
    return 1 / (len(var.patch_nums) * l_k[var.lvl_1L[0]].float())


# ----------------------------------------------------------------------------------------------------------
# The policy, §8: what is trained, the reference it is held to, and the two things GRPO does with them: roll out
# (§4-5: sample, record log pi_old, score; log pi_ref for the KL term) and accumulate the gradient of J (§7).
# Full fine-tuning (default) trains every weight of VAR, and pi_ref is a frozen copy of the starting model. With
# --lora-rank, LoRA adapters (appendix E) are trained instead and pi_ref is the same model with the adapters off.
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """A step's samples and what the updates need of them, one row per image (§4-5)."""
    label_B: torch.Tensor                 # (B,) each image's class: group p is images p*G .. p*G+G-1
    tokens: List[torch.Tensor]            # K token maps (B, pn*pn), the actions
    logp_old_BL: torch.Tensor             # (B, L) log pi_old of each drawn token
    logp_ref_BL: Optional[torch.Tensor]   # (B, L) log pi_ref of each drawn token (None when beta = 0)
    reward_B: torch.Tensor                # (B,) R, the weighted sum
    parts: dict                           # each component R_j alone: name -> (B,)
    features_BD: torch.Tensor             # (B, D) what diversity is measured on (CLIP image embeddings)
    logp_sampler_BL: Optional[torch.Tensor] = None  # (B, L) with --old-logprobs recompute, what the sampler recorded


class Policy:
    """pi_theta, the VAR that AdamW trains (full fine-tuning, or its LoRA adapters), and pi_ref, the starting policy
    the KL term holds it to: a frozen copy, or with LoRA the same VAR with its adapters off (none with beta = 0 and
    full fine-tuning). `ranks` (appendix H) splits the work over torchrun's processes, `clock` (appendix C) times it;
    by default one process and a clock not started, which do nothing."""
    def __init__(self, var: VAR, args: Config, ranks=None, clock=None):
        self.var, self.lora = var, args.lora_rank > 0
        if self.lora:
            add_lora(var, args.lora_rank)  # appendix E: W + W_up W_down on every block's linears, W frozen, W_up = 0
        self.ref = copy.deepcopy(var).requires_grad_(False) if args.beta > 0 and not self.lora else None
        self.trained = [p for p in var.parameters() if p.requires_grad]
        self.ranks, self.clock = ranks or Ranks(), clock or PhaseClock()  # appendix H and C: by default, do nothing

    @contextmanager
    def reference(self):
        """pi_ref, as a VAR to run: the frozen copy, or var with its adapters off (adapters_off, appendix E)."""
        if self.ref is None and not self.lora:
            raise ValueError("no reference policy is kept with --beta 0 and full fine-tuning")
        with nullcontext(self.ref) if self.ref is not None else adapters_off(self.var) as ref:
            yield ref

    @torch.no_grad()
    def rollout(self, vae: VQVAE, reward_fn, label_B, seed_B, args: Config) -> Rollout:
        """§4-5 for these images: draw them from pi_old = pi_theta (image b from seed_B[b]) with each token's
        log pi_old, score them, and compute log pi_ref of their tokens for the KL term (with --old-logprobs recompute,
        log pi_old too, from one teacher-forced pass). The teacher-forced passes run --micro-batch images at a time."""
        mine = self.ranks.share(len(label_B))  # appendix H: this process's P/N whole groups (one process: all)
        label_B, seed_B = label_B[mine], seed_B[mine]
        # --sample-batch images at a time (appendix E): the KV cache holds one chunk; the images are the same
        drawn = sample_in_chunks(self.var, vae, label_B, seed_B, args.sample_batch, args.cfg, args.temperature,
                                 return_logprobs=True)
        self.clock("rollout")  # appendix C: the seconds and the peak memory of each phase
        reward_B, parts, features_BD = reward_fn(drawn.image)
        self.clock("reward")  # appendix C

        def teacher_forced(model):
            return torch.cat([token_logprobs(model, vae, label_B[i:i + args.micro_batch],
                                             [r_Bl[i:i + args.micro_batch] for r_Bl in drawn.tokens], args.cfg,
                                             args.temperature) for i in range(0, len(label_B), args.micro_batch)])
        logp_old_BL = drawn.logp_BL if args.old_logprobs == "sampler" else teacher_forced(self.var)
        logp_ref_BL = None
        if args.beta > 0:
            with self.reference() as ref:
                logp_ref_BL = teacher_forced(ref)
        self.clock("rollout")  # appendix C
        roll = Rollout(label_B, drawn.tokens, logp_old_BL, logp_ref_BL, reward_B, parts, features_BD,
                       None if args.old_logprobs == "sampler" else drawn.logp_BL)
        return self.ranks.gather(roll)  # appendix H: every process gets the rollouts of all P groups

    def accumulate_gradients(self, vae: VQVAE, roll: Rollout, adv_B, idx_B, args: Config) -> List[dict]:
        """§7 on the rollout's images idx_B: the gradient of J averaged over them, added to the trained weights'
        .grad, --micro-batch images per forward and backward pass. Returns each micro-batch's statistics (grpo_loss's,
        and the mean entropy of pi_theta's token distributions)."""
        weight_L = scale_token_weights(self.var) if args.token_weight == "scale" else None  # None: every token 1/L
        idx_B, stats = idx_B[self.ranks.share(len(idx_B))], []  # appendix H: this process's 1/N of the minibatch
        for idx in idx_B.view(-1, min(args.micro_batch, len(idx_B))):
            logp_BL, entropy_BL = token_logprobs(self.var, vae, roll.label_B[idx], [r_Bl[idx] for r_Bl in roll.tokens],
                                                 args.cfg, args.temperature, entropy=True)
            loss, loss_stats = grpo_loss(logp_BL, roll.logp_old_BL[idx], adv_B[idx],
                                         None if roll.logp_ref_BL is None else roll.logp_ref_BL[idx],
                                         args.clip_eps, args.beta, weight_L)
            check_finite(loss_stats, args)  # appendix C: a non-finite loss stops the run with what to change
            (loss * (len(idx) / len(idx_B))).backward()  # the mean over idx_B, whatever the micro-batch
            stats.append(dict(loss_stats, entropy=entropy_BL.mean().item()))
        self.ranks.average_gradients(self.trained)  # appendix H: the mean over the processes, as DDP computes it
        return self.ranks.gather_stats(stats)  # appendix H: every process's statistics, for the step's record


# ----------------------------------------------------------------------------------------------------------
# The training loop, §4-8 once per step: grpo_step is one step, train sets up and loops. What is logged, where files
# go, resuming and stopping on a signal belong to the run directory (appendix D); it changes nothing a step computes.
# ----------------------------------------------------------------------------------------------------------

def grpo_step(policy: Policy, vae: VQVAE, reward_fn, opt, label_B, args: Config, step: int) -> dict:
    """One GRPO step (docstring §4-8) on P groups of G images: label_B holds the P classes, each repeated G times.
    Its random draws are keyed by (--seed, step). Returns the rollout, the advantages, each minibatch's micro-batch
    statistics and gradient norm: what the step's log record is made of (appendix C)."""
    # 4-5. rollout: P*G images from the current policy, each token's log pi_old and log pi_ref, each image's reward
    roll = policy.rollout(vae, reward_fn, label_B, image_seeds(len(label_B), args.seed, "rollout", step), args)
    # 6. group-relative advantages
    adv_B = group_advantages(roll.reward_B, args.group_size, args.adv_eps, args.adv_norm)
    # 7-8. --inner-epochs passes of clipped policy-gradient updates over --minibatches shuffled minibatches
    stats, grad_norms = [], []  # stats: one list of micro-batch statistics per minibatch
    for epoch in range(args.inner_epochs):
        order_B = torch.randperm(len(label_B), generator=generator(args.seed, "shuffle", step, epoch)).to(label_B.device)
        for idx_B in order_B.view(args.minibatches, -1):
            opt.zero_grad(set_to_none=True)
            stats.append(policy.accumulate_gradients(vae, roll, adv_B, idx_B, args))
            grad_norms.append(nn.utils.clip_grad_norm_(policy.trained, args.max_grad_norm).item())
            check_finite(dict(grad_norm=grad_norms[-1]), args)  # appendix C: before opt.step could write NaN weights
            opt.step()
    return dict(rollout=roll, adv_B=adv_B, stats=stats, grad_norms=grad_norms)


def train(args: RunConfig) -> dict:
    """GRPO as the settings say, from Python as from the command line: the pretrained models (§1-3), the reward
    (§5), the policy (§8), then §4-8 once per step. Returns {"out", "records", "var", "summary", "stopped"}."""
    with Run(args).begin() as run:  # appendix D: every setting checked, --out taken for this run, the checkpoint opened
        torch.manual_seed(args.seed)  # what draws from torch's global generator: LoRA's W_down
        vae, var = load_models(args, run.device)
        reward_fn = build_reward(args, run.device)
        policy = Policy(var, args, run.ranks, run.clock)  # appendix H and C: torchrun's processes, the step's timing
        use_the_device(args, run.device, policy)  # appendix E: bf16 frozen weights, --compile, --grad-checkpointing
        opt = torch.optim.AdamW(policy.trained, lr=args.lora_lr if policy.lora else args.lr,
                                weight_decay=args.weight_decay, fused=run.device.type == "cuda")
        pool, heldout = class_pools(args, var.num_classes)  # heldout: never drawn for training, measured apart at the end
        for step in run.steps(policy, vae, reward_fn, opt, pool):  # from 0, or where --resume continues; a signal ends it
            label_P = pool[torch.randint(len(pool), (args.classes_per_step,), generator=generator(args.seed, "classes", step))]
            label_B = label_P.repeat_interleave(args.group_size).to(run.device)  # group p: images p*G .. p*G+G-1
            run.record(step, grpo_step(policy, vae, reward_fn, opt, label_B, args, step))  # logs, evaluates, saves
        return run.finish(policy, vae, reward_fn, pool, heldout)  # summary.json: fresh samples, start against end


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None):
    """The command line: the settings from the flags (appendix B), then train, or with --bench time whole steps
    (appendix F). An error ends in one message that says what to do (appendix D), never a traceback."""
    args = parse_config(argv)
    with errors_as_messages(args):
        return benchmark(args) if args.bench else train(args)


# ==========================================================================================================
# APPENDIX: plumbing. Nothing below changes what the method computes; a reader who stops here has read all of it.
#   A. weights: downloads and loading       B. the command line (RunConfig) and validation
#   C. measuring a run: the step's record, evaluation grids, the summary, the toy world's pixel measures
#   D. the run directory and its files      E. speed and memory on a GPU     F. the benchmark (--bench)
#   G. the VQGAN encoder and decoder CNN of the tokenizer      H. more than one GPU (torchrun)
# ==========================================================================================================

# The appendix's own imports: the method above needs only torch and numpy.
import argparse
import ast
import atexit
import importlib
import inspect
import json
import os
import pickle
import re
import shutil
import signal
import stat
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout, suppress
from dataclasses import fields
from datetime import timedelta
from pathlib import Path

import requests
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------
# A. Weights. VAR, the VQ-VAE and CLIP come from Hugging Face through huggingface_hub, into the cache every Hugging
# Face tool shares (resumed, locked, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE); the aesthetic head, one small file on
# GitHub, is checked against its known sha256. Everything is loaded with strict=True and weights_only=True.
# ----------------------------------------------------------------------------------------------------------

VAR_REPO, VAE_FILE = "FoundationVision/var", "vae_ch160v4096z32.pth"
CLIP_REPO, CLIP_FILE = "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"  # where open_clip gets it
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"  # testdata/aesthetic/ holds it


class WeightsError(RuntimeError):
    """A weight file could not be downloaded or does not fit the model; the message says what to do."""


def cache_dir(args: Config) -> Path:
    """Where this script keeps what is not on the Hub: the aesthetic head."""
    return Path(args.cache_dir or os.environ.get("VAR_GRPO_CACHE") or Path.home() / ".cache" / "var_grpo")


def hub_file(repo: str, name: str, flag: str) -> Path:
    """The file `name` of the Hub repository `repo`, from the Hugging Face cache or downloaded into it."""
    from huggingface_hub import hf_hub_download
    try:
        path = Path(hf_hub_download(repo, name))
    except Exception as e:
        raise WeightsError(f"{name} of the Hub repository {repo} is not in the Hugging Face cache and could not be "
                           f"downloaded ({type(e).__name__}: {first_line(e)}); fetch it with `hf download {repo} {name}` "
                           f"on a machine online, or pass its path with {flag}") from None
    blob = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and file_sha256(blob) != blob.name:
        blob.unlink()
        raise WeightsError(f"{name} of {repo} in the Hugging Face cache was corrupt (its sha256 is not {blob.name}) and was deleted: run again")
    return path


def aesthetic_file(args: Config) -> Path:
    """The LAION head in cache_dir, else downloaded, checked, written to this process's own file and renamed into place."""
    dest = cache_dir(args) / "sac+logos+ava1-l14-linearMSE.pth"
    if dest.is_file():
        return dest
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise WeightsError(f"{dest} does not exist and HF_HUB_OFFLINE is set: download {AESTHETIC_URL} to that path, "
                           f"or pass it with --aesthetic-ckpt")
    try:
        response = requests.get(AESTHETIC_URL, timeout=60)
        response.raise_for_status()
    except requests.RequestException as e:
        raise WeightsError(f"downloading {AESTHETIC_URL} failed ({first_line(e)}); save it as {dest}, or pass --aesthetic-ckpt") from None
    if hashlib.sha256(response.content).hexdigest() != AESTHETIC_SHA256:
        raise WeightsError(f"the file downloaded from {AESTHETIC_URL} is not the LAION head (wrong sha256): nothing was kept, run again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    with open_to_write(part, "wb") as f:
        f.write(response.content)
    os.replace(part, dest)
    return dest


def local_file(path: str) -> Path:
    """A weight file the user gave (--*-ckpt), which must exist: no network needed."""
    if not Path(path).is_file():
        raise WeightsError(f"{path} is {'a directory' if Path(path).is_dir() else 'not there'}; give the path of a weight file")
    return Path(path)


def first_line(e: BaseException) -> str:
    """The first line of an error's message (an empty file's error may have none), for a message of our own."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a state_dict with the official key names into a model built on the meta device (no init cost)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path} is not a PyTorch checkpoint torch.load can read ({first_line(e)}); nothing in it was run") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        held = list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
        raise WeightsError(f"{path} is not a plain state_dict of tensors (it holds {held}); checkpoints go to --resume")
    if isinstance(model, VAR) and "class_emb.weight" in sd and sd["class_emb.weight"].shape[1] != model.C:
        width = sd["class_emb.weight"].shape[1]
        raise WeightsError(f"{path} looks like VAR-d{width // 64} (width {width}) but depth {model.depth} was asked: "
                           f"pass --depth {width // 64}")
    problems = key_problems(model.state_dict(), sd)
    if problems:
        raise WeightsError(f"{path} does not fit the {type(model).__name__} that was built: {'; '.join(problems)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float()  # the fixtures store fp16; the official files fp32


def key_problems(want: dict, got: dict) -> List[str]:
    """How the state_dict `got` differs from `want` (a model's): missing and unexpected keys, wrong shapes."""
    shape = lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k} {shape(got[k])} instead of {shape(want[k])}" for k in want if k in got and shape(got[k]) != shape(want[k])]
    return [f"{what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}" for what, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if items]


def build_var(arch: dict, depth: int) -> VAR:
    """VAR of the official shape at this depth: width 64*depth, one head per 64 channels."""
    keys = ("vocab_size", "z_channels", "patch_nums", "num_classes", "norm_eps", "mlp_ratio")
    return VAR(depth=depth, embed_dim=64 * depth, num_heads=depth, **{k: arch[k] for k in keys})


def build_vae(arch: dict) -> VQVAE:
    keys = ("vocab_size", "z_channels", "ch", "patch_nums", "quant_resi", "share_quant_resi")
    cnn = ("ch_mult", "num_res_blocks", "norm_groups")  # the official VQVAE's unless the arch says otherwise
    return VQVAE(**{k: arch[k] for k in keys}, **{k: arch[k] for k in cnn if k in arch})


def load_models(args: Config, device: torch.device):
    """(vae, var): the official weights for --depth, or the toy world's for --tiny."""
    files = base_weight_files(args)
    if args.tiny:
        with torch.device("meta"):
            vae, var = build_vae(TOY_ARCH), build_var(TOY_ARCH, TOY_DEPTH)
        vae, var = load_toy(vae, "vae.pth", str(files["vae"])).to(device), load_toy(var, "var.pth", str(files["var"])).to(device)
        check_toy_set(dict(files, clip=Path(toy_path("clip.pth", args.clip_ckpt)),
                           aesthetic=Path(toy_path("aesthetic.pth", args.aesthetic_ckpt))))
        return vae, var
    with torch.device("meta"):  # no random init of 300M+ parameters only to overwrite them
        vae, var = build_vae(OFFICIAL_ARCH), build_var(OFFICIAL_ARCH, args.depth)
    return load_weights(vae, files["vae"]).to(device), load_weights(var, files["var"]).to(device)


def base_weight_files(args: Config) -> dict:
    """{"vae": path, "var": path}: the files the tokenizer and the starting VAR are read from."""
    if args.tiny:
        return {"vae": Path(toy_path("vae.pth", args.vae_ckpt)), "var": Path(toy_path("var.pth", args.var_ckpt))}
    return {"vae": local_file(args.vae_ckpt) if args.vae_ckpt else hub_file(VAR_REPO, VAE_FILE, "--vae-ckpt"),
            "var": local_file(args.var_ckpt) if args.var_ckpt else hub_file(VAR_REPO, f"var_d{args.depth}.pth", "--var-ckpt")}


_sha256_of: dict = {}  # (path, size, mtime) -> sha256: each file is hashed once per process unless it changes


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha256_of:
        hasher = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                hasher.update(block)
        _sha256_of[key] = hasher.hexdigest()
    return _sha256_of[key]


def base_fingerprint(args: Config) -> dict:
    """The sha256 of each base weight file, kept in every checkpoint: a resume or a LoRA merge refuses another base."""
    return {name: file_sha256(path) for name, path in base_weight_files(args).items()}


TOY_DIR = Path(__file__).resolve().parent / "notebooks" / "toy"
TOY_RESTORE = (f"The toy world's weights ship in {TOY_DIR}: restore them with `git checkout -- notebooks/toy`, or "
               f"rebuild them with `python notebooks/toy_world.py --out notebooks/toy` (~25 minutes on 2 cores).")


def toy_path(name: str, local: str = "") -> str:
    """The path of a toy world weight file (shipped in notebooks/toy/, or a local file), which must exist."""
    path = Path(local) if local else TOY_DIR / name
    if not path.is_file():
        raise WeightsError(f"{path} does not exist.\n{TOY_RESTORE}")
    return str(path)


TOY_SET = "toy_set.json"  # beside the toy weights (toy_world.py writes it last): the set's id, each file's sha256


def check_toy_set(paths: dict):
    """The toy models are trained on one another: they must be files of one toy_world.py run (toy_set.json)."""
    sets = {}
    for name, path in paths.items():
        listed = json.loads((path.parent / TOY_SET).read_text()) if (path.parent / TOY_SET).is_file() else None
        if name == "var" and (listed is None or path.name not in listed["files"]):
            continue
        if listed is None or listed["files"].get(path.name) != file_sha256(path):
            raise WeightsError(f"{path} is not a file that {path.parent / TOY_SET} lists: the folder holds a half-written "
                               f"or mixed set of toy weights.\n{TOY_RESTORE}")
        sets[name] = listed["set"]
    if len(set(sets.values())) > 1:
        raise WeightsError("the toy weights come from different runs of toy_world.py: " + ", ".join(
            f"{paths[n]} (set {s[:8]})" for n, s in sets.items()) + "; pass the files of one folder")


def load_toy(model: nn.Module, name: str, local: str = "") -> nn.Module:
    """The toy world's weights loaded into model, with the way to restore or rebuild them on error."""
    path = Path(toy_path(name, local))
    try:
        return load_weights(model, path)
    except WeightsError as e:
        raise WeightsError(f"{e}\n{TOY_RESTORE}" if path.resolve().parent == TOY_DIR else str(e)) from None


def load_clip(name: str, pretrained: Optional[str]):
    """open_clip's model `name` with the weights `pretrained` (a file or an open_clip tag; None: random)."""
    import open_clip
    try:
        return open_clip.create_model(name, pretrained=pretrained)
    except Exception as e:
        if pretrained is None or not Path(pretrained).is_file():
            raise
        restore = f"\n{TOY_RESTORE}" if Path(pretrained).resolve().parent == TOY_DIR else ""
        raise WeightsError(f"{pretrained} cannot be loaded as {name} weights by open_clip ({type(e).__name__}: "
                           f"{str(e)[:300]}).{restore}") from None


def clip_weights(args: Config) -> str:
    """What open_clip's `pretrained` gets: --clip-ckpt (a file or a tag), else the OpenAI ViT-L/14 from the cache."""
    return args.clip_ckpt or str(hub_file(CLIP_REPO, CLIP_FILE, "--clip-ckpt"))


# The toy world's CLIP: an open_clip model of the config shipped beside its weights (64-d embeddings, 32 px images),
# trained contrastively on toy images and their captions ("a large white star on the left"), read as ViT-L/14 is.
TOY_CLIP = "var-grpo-toy-clip"


def register_toy_clip() -> str:
    """Tell open_clip about the toy CLIP's config, notebooks/toy/var-grpo-toy-clip.json; returns its model name."""
    import open_clip
    if TOY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(toy_path(f"{TOY_CLIP}.json"))
    return TOY_CLIP


def load_clip_for(args: Config, device: torch.device, random_weights: bool = False):
    """(CLIP model, tokenizer): the toy world's, --clip-model's OpenAI weights or --clip-ckpt, or untrained."""
    import open_clip
    name = register_toy_clip() if args.tiny else args.clip_model
    pretrained = None if random_weights else toy_path("clip.pth", args.clip_ckpt) if args.tiny else clip_weights(args)
    clip_model = load_clip(name, pretrained).to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    n_tokens = len(tokenizer.encode(args.prompt)) + 2  # + start and end of text
    if n_tokens > tokenizer.context_length:
        print(f"warning: the prompt has {n_tokens} CLIP tokens; CLIP reads only the first {tokenizer.context_length}", file=sys.stderr)
    return clip_model, tokenizer


class AestheticHead(nn.Module):
    """The LAION predictor's MLP (keys layers.{0,2,4,6,7}); dropout is inactive at inference and kept for the keys."""
    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb_BD):
        return self.layers(F.normalize(emb_BD.float(), dim=-1)).squeeze(-1)


def load_aesthetic_for(args: Config, dim: int, device: torch.device, random_weights: bool = False) -> AestheticHead:
    """The aesthetic head on dim-d embeddings: the toy world's, the LAION head (768-d ViT-L/14 only), or untrained."""
    if args.tiny:
        aesthetic = load_toy(AestheticHead(dim), "aesthetic.pth", args.aesthetic_ckpt)
    elif dim != 768:
        raise ValueError(f"the aesthetic reward reads 768-d ViT-L/14 image embeddings, but {args.clip_model} gives "
                         f"{dim}-d; use --clip-model ViT-L-14-quickgelu or drop aesthetic from --reward")
    elif random_weights:
        aesthetic = AestheticHead()
    else:
        with torch.device("meta"):
            aesthetic = AestheticHead()
        aesthetic = load_weights(aesthetic, local_file(args.aesthetic_ckpt) if args.aesthetic_ckpt else aesthetic_file(args))
    return aesthetic.to(device).eval().requires_grad_(False)


def own_reward(name: str, side: int, device: torch.device = torch.device("cpu")):
    """`--reward module:function` imported (current directory or PYTHONPATH) and tried on 2 random images on device."""
    module_name, _, function = name.partition(":")
    if module_name.endswith(".py"):  # a file name, not a module's
        raise ValueError(f"--reward {name}: drop the .py, as Python imports it: --reward {module_name[:-3]}:{function}")
    if os.getcwd() not in sys.path:  # `python var_grpo.py` puts the script's folder on the path, not the current one
        sys.path.insert(0, os.getcwd())
    importlib.invalidate_caches()  # a module written since this process started is found
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"--reward {name}: the module {module_name!r} cannot be imported ({type(e).__name__}: "
                         f"{first_line(e)}); put it in the current directory ({os.getcwd()}) or on PYTHONPATH") from None
    reward_of = getattr(module, function, None)
    if not callable(reward_of):
        raise ValueError(f"--reward {name}: {getattr(module, '__file__', module_name)} has no function {function!r}")

    def reward_B(images_B3HW):  # given a copy; its result detached, (B,) float32 on the images' device, or ValueError
        try:  # SystemExit too: a sys.exit() in it must not end the run as if it had finished
            out = torch.as_tensor(reward_of(images_B3HW.clone()), dtype=torch.float32, device=images_B3HW.device).detach()
        except (Exception, SystemExit) as e:
            raise ValueError(f"the reward {name} raised {type(e).__name__}: {first_line(e)}") from None
        if out.shape != (len(images_B3HW),):
            raise ValueError(f"the reward {name} returned shape {tuple(out.shape)} for {len(images_B3HW)} images; it "
                             f"must return one number per image")
        return out
    try:
        finite = torch.isfinite(reward_B(torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)).to(
            device))).all()
    except ValueError as e:
        raise ValueError(f"--reward {name}, tried on 2 random images (2, 3, {side}, {side}) in [0, 1]: {e}") from None
    if not finite:
        raise ValueError(f"--reward {name} returned values that are not finite for 2 random images (2, 3, {side}, "
                         f"{side}) in [0, 1]; it must return one finite number per image")
    return reward_B


def build_reward(args: Config, device: torch.device, random_weights: bool = False) -> Reward:
    """The reward of --reward: CLIP and the aesthetic head (real, toy or untrained), rewards of one's own."""
    weights = parse_reward_spec(args.reward)
    own = {name: own_reward(name, 32 if args.tiny else 256, device) for name in weights if ":" in name}
    clip_model = text_emb_D = aesthetic = None
    if "clip" in weights or "aesthetic" in weights:
        clip_model, tokenizer = load_clip_for(args, device, random_weights)
        with torch.no_grad():
            text_emb_D = F.normalize(clip_model.encode_text(tokenizer([args.prompt]).to(device)).float(), dim=-1)[0]
        if "aesthetic" in weights:
            aesthetic = load_aesthetic_for(args, text_emb_D.shape[0], device, random_weights)
    return Reward(weights, clip_model, text_emb_D, aesthetic, own).to(device)


def clip_preprocess(images_B3HW, size: int, mean, std):
    """open_clip's image transform on the device: bicubic resize of the short side to `size`, centre crop, normalise."""
    H, W = images_B3HW.shape[-2:]
    new_hw = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)
    x = F.interpolate(images_B3HW.float(), size=new_hw, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    top, left = round((x.shape[-2] - size) / 2), round((x.shape[-1] - size) / 2)
    x = x[..., top:top + size, left:left + size]
    return (x - torch.tensor(mean, device=x.device).view(3, 1, 1)) / torch.tensor(std, device=x.device).view(3, 1, 1)


def clip_input(clip_model, images_B3HW):
    """Images in [0, 1] as clip_model's image tower expects them (its own size, mean and std)."""
    pp = clip_model.visual.preprocess_cfg
    return clip_preprocess(images_B3HW, pp["size"] if isinstance(pp["size"], int) else pp["size"][0], pp["mean"], pp["std"])


# ----------------------------------------------------------------------------------------------------------
# B. The command line and validation. RunConfig adds to Config how and where a run executes; the command line is
# derived from both (one --flag per field, its docstring as help), and every setting is checked before any work.
# ----------------------------------------------------------------------------------------------------------

@dataclass
class RunConfig(Config):
    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    vae_ckpt: str = ""
    """local path of vae_ch160v4096z32.pth; empty: from the Hugging Face cache, downloaded if missing"""
    var_ckpt: str = ""
    """local path of var_d{depth}.pth (or weights this script exported); empty: from the Hugging Face cache"""
    clip_ckpt: str = ""
    """CLIP weights: a local file or an open_clip pretrained tag; empty: the OpenAI ViT-L/14 from the Hugging Face cache"""
    aesthetic_ckpt: str = ""
    """local path of sac+logos+ava1-l14-linearMSE.pth; empty: from --cache-dir, downloaded if missing"""
    cache_dir: str = ""
    """where the aesthetic head is kept; empty: $VAR_GRPO_CACHE, else ~/.cache/var_grpo"""
    out: str = ""
    """output directory, one run at a time; empty: runs/<prompt>-d<depth> (runs/tiny-<prompt>-<reward> with --tiny)"""
    resume: bool = False
    """continue the run in --out from its checkpoint.pt: the same method, its length and how it runs may change"""
    eval_every: int = 50
    """save an evaluation grid every this many steps (also at step 0 and at the end)"""
    save_every: int = 50
    """write a resumable checkpoint every this many steps (also at the end and on Ctrl-C)"""
    num_eval: int = 8
    """images in an evaluation grid, at fixed (class, seed) pairs"""
    eval_cfg: float = -1.0
    """guidance of the evaluation grids; negative: --cfg (guided grids of a run trained with --cfg 0 are a known recipe)"""
    eval_top_k: int = 900
    """top-k for evaluation images only (RL rollouts sample the full distribution, so their log-probs are exact)"""
    eval_top_p: float = 0.96
    """top-p for evaluation images only (0: off)"""
    summary_samples: int = 256
    """at the end, fresh samples of the starting and the final policy (same classes and seeds) scored into summary.json"""
    heldout_classes: str = "auto"
    """classes never trained on, measured apart in summary.json: ids, none (or empty), or auto (a tenth of a pool of >= 100)"""
    micro_batch: int = 8
    """images per forward/backward pass; gradients accumulate over a minibatch (lower it to save memory)"""
    sample_batch: int = 0
    """images sampled at once in a rollout (0: all P*G); lower it to save the KV cache's memory (same images drawn)"""
    grad_checkpointing: bool = False
    """recompute each block's activations in the backward pass: less memory, ~30% slower updates"""
    compile: bool = True
    """GPU only: torch.compile the VAR's teacher-forced pass (needs triton; README: what it saves)"""
    bench: bool = False
    """time whole GRPO steps at --depth with random weights (no download), then exit"""


def field_help() -> dict:
    """{field name: the docstring written under it} for Config and RunConfig, parsed from this file's source."""
    helps = {}
    for cls in (Config, RunConfig):
        body = ast.parse(inspect.getsource(cls)).body[0].body
        helps.update({a.target.id: b.value.value for a, b in zip(body, body[1:])
                      if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)})
    return helps


def parse_config(argv: Optional[List[str]] = None) -> RunConfig:
    """The command line is derived from RunConfig (Config's fields, then the run's): one --flag per field."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=f"--tiny changes the defaults: {TINY_DEFAULTS}",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = {name: text.replace("%", "%%") for name, text in field_help().items()}  # argparse formats help with %
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=helps[f.name])
    if parser.parse_args(argv).tiny:
        parser.set_defaults(**TINY_DEFAULTS)
    return RunConfig(**vars(parser.parse_args(argv)))


MIN_REWARD_WEIGHT, MAX_REWARD_WEIGHT = 1e-6, 1e6  # only ratios matter; outside, float32 or --adv-eps drowns them


def parse_reward_spec(spec: str) -> dict:
    """"clip=1,aesthetic=0.05" -> {"clip": 1.0, "aesthetic": 0.05}, with errors that say how to fix the flag."""
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if name not in REWARD_NAMES and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
            raise ValueError(f"--reward: unknown component {name!r}; choose from {', '.join(REWARD_NAMES)} or module:function")
        try:
            weight = float(value) if eq else float("nan")
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight):
            raise ValueError(f"--reward: {part!r} needs a finite number after '=', e.g. {name}=1")
        if weight and not MIN_REWARD_WEIGHT <= abs(weight) <= MAX_REWARD_WEIGHT:  # 1e39 is inf in float32, 1e-46 is 0
            raise ValueError(f"--reward: {part!r}: a weight's size must be at most {MAX_REWARD_WEIGHT:g} and at least "
                             f"{MIN_REWARD_WEIGHT:g}, where --adv-eps would drown the reward's spread (only ratios matter)")
        if name in weights:
            raise ValueError(f"--reward: {name!r} is given twice in {spec!r}")
        weights[name] = weight
    if not weights or not any(weights.values()):
        raise ValueError(f"--reward {spec!r} has no component with a non-zero weight, e.g. --reward clip=1")
    return weights


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device, or a ValueError saying why it cannot be used here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: this script runs on cpu or cuda only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu, or a CUDA build of torch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def parse_classes(spec: str, num_classes: int, flag: str = "--classes") -> torch.Tensor:
    """The class ids of --classes (empty: all of them) or of --heldout-classes."""
    if not spec.strip():
        return torch.arange(num_classes)
    try:
        ids = [int(i) for i in spec.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"{flag} {spec!r} must be comma-separated integers, e.g. {flag} 207,360,980") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if not ids or bad:
        raise ValueError(f"{flag} {spec!r}: class ids must lie in 0..{num_classes - 1} (got {bad or 'none'})")
    return torch.tensor(ids)


def class_pools(args: Config, num_classes: int):
    """(training, held-out classes); auto holds out a seeded tenth of a pool of >= 100 classes."""
    pool, spec = parse_classes(args.classes, num_classes), args.heldout_classes.strip().lower()
    if spec in ("none", "") or (spec == "auto" and len(pool) < 100):
        return pool, pool[:0]
    if spec == "auto":
        order = torch.randperm(len(pool), generator=generator(args.seed, "heldout"))
        heldout = pool[order[:len(pool) // 10]].sort().values
    else:
        heldout = parse_classes(spec, num_classes, "--heldout-classes")
    training = pool[~torch.isin(pool, heldout)]
    if len(training) == 0:
        raise ValueError(f"--heldout-classes {args.heldout_classes!r} holds out every class of the pool; leave some to train on")
    return training, heldout


OFFICIAL_DEPTHS = (16, 20, 24, 30)  # the var_d{depth}.pth files FoundationVision publishes


def check_config(args: Config):
    """Reject bad settings before any download, model load or other work, all problems in one message."""
    problems = []

    def need(ok: bool, problem: str):
        if not ok:
            problems.append(problem)
    for f in fields(RunConfig):  # argparse reads "nan" and "inf" as floats, and integers of any size
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        need(not isinstance(value, float) or math.isfinite(value), f"{flag} {value}: must be a finite number")
        limit = 2**62 if f.name == "seed" else 2**31
        need(not isinstance(value, int) or abs(value) < limit, f"{flag} {value}: must be below {limit} in size")
    if problems:
        raise ValueError("bad configuration:\n  " + "\n  ".join(problems))
    need(args.group_size >= 2, f"--group-size {args.group_size}: GRPO compares images within a group, so it needs at least 2")
    for least, names in ((1, "classes_per_step minibatches micro_batch inner_epochs steps eval_every save_every num_eval"),
                         (0, "summary_samples sample_batch lora_rank eval_top_k beta cfg adv_eps weight_decay seed")):
        for name in names.split():
            need(getattr(args, name) >= least, f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {least}")
    for flag, value in (("--lr", args.lr), ("--lora-lr", args.lora_lr)):
        need(0 < value <= 1, f"{flag} {value}: must be in (0, 1], as AdamW moves each weight by about lr a step")
    if args.lora_rank > 0:  # a learning rate that the run would not use is a mistake, not a setting
        need(args.lr in (Config.lr, TINY_DEFAULTS["lr"]), f"--lr {args.lr} is full fine-tuning's: LoRA adapters train at "
                                                          f"--lora-lr (now {args.lora_lr}); set that instead")
    else:
        need(args.lora_lr in (Config.lora_lr, TINY_DEFAULTS["lora_lr"]), f"--lora-lr {args.lora_lr} is LoRA's: without "
             f"--lora-rank every weight trains at --lr (now {args.lr}); set that instead")
    need(args.temperature > 0, f"--temperature {args.temperature}: must be > 0 (1: the model's own distribution)")
    need(0 < args.clip_eps <= 1, f"--clip-eps {args.clip_eps}: must be in (0, 1] (0.2 is usual)")
    need(args.max_grad_norm > 0, f"--max-grad-norm {args.max_grad_norm}: must be > 0")
    need(0 <= args.eval_top_p <= 1, f"--eval-top-p {args.eval_top_p}: must be in [0, 1] (0: off)")
    need(args.num_eval <= 256, f"--num-eval {args.num_eval}: at most 256 (an evaluation grid is one PNG, 4 images a row)")
    n, P, N = args.classes_per_step * args.group_size, args.classes_per_step, world_size()  # N: torchrun's processes
    if N > 1:  # appendix H
        need(P % N == 0, f"--classes-per-step {P}: torchrun started {N} processes, which sample whole groups, so it must "
                         f"be a multiple of {N}")
        need(not args.bench, "--bench times one process: run it with python, not torchrun")
    if P >= 1 and args.minibatches >= 1 and args.micro_batch >= 1:
        mb = n // args.minibatches
        part = mb // N  # a minibatch's images per process; a micro-batch larger than the part is cut to it
        need(n % args.minibatches == 0 and mb % N == 0 and part % min(args.micro_batch, max(part, 1)) == 0,
             f"P*G = {P}*{args.group_size} = {n} images must split into --minibatches {args.minibatches}" + (f", each into "
             f"{N} equal parts (one per process)," if N > 1 else "") + f" of whole --micro-batch {args.micro_batch}s")
    for flag, value, choices in (("--adv-norm", args.adv_norm, ("group", "batch", "none")),
                                 ("--old-logprobs", args.old_logprobs, ("sampler", "recompute")),
                                 ("--token-weight", args.token_weight, ("token", "scale"))):
        need(value in choices, f"{flag} {value!r}: choose one of {', '.join(choices)}")
    if args.tiny:
        need(args.depth == Config.depth, f"--tiny uses the toy world's VAR-d{TOY_DEPTH}; drop --depth")
        need(args.clip_model == Config.clip_model, f"--clip-model {args.clip_model}: --tiny uses the toy world's CLIP (clip.pth); drop --clip-model")
    elif not args.var_ckpt and not args.bench:  # the weights are downloaded: only the published depths exist
        need(args.depth in OFFICIAL_DEPTHS, f"--depth {args.depth}: official VAR weights exist for depth "
                                           f"{', '.join(map(str, OFFICIAL_DEPTHS))}; or pass your own with --var-ckpt")
    else:
        need(args.depth >= 1, f"--depth {args.depth}: must be at least 1")

    def attempt(check, *a):  # a check that raises its own message
        try:
            return check(*a)
        except ValueError as e:
            problems.append(str(e))
    reward, device = attempt(parse_reward_spec, args.reward) or {}, attempt(resolve_device, args.device)
    for name in [name for name in reward if ":" in name]:  # a reward of one's own works on the run's device
        attempt(own_reward, name, 32 if args.tiny else 256, device or torch.device("cpu"))
    attempt(class_pools, args, (TOY_ARCH if args.tiny else OFFICIAL_ARCH)["num_classes"])
    need("clip" not in reward or bool(args.prompt.strip()), "--prompt is empty but the clip reward needs a text")
    need(args.tiny or args.bench or not {"clip", "aesthetic"} & set(reward) or args.clip_model == Config.clip_model
         or bool(args.clip_ckpt),
         f"--clip-model {args.clip_model} needs --clip-ckpt: a local weight file or an open_clip pretrained tag")
    if problems:
        raise ValueError("bad configuration:\n  " + "\n  ".join(problems))


def check_writable(path: Path, what: str):
    """Create directory `path` if needed and prove it takes a file, before any work is done there."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; give a directory (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        open_to_write(probe, "w").close()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot create or write files there ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------------
# C. Measuring a run: each step's timing (PhaseClock, which the policy's phases mark) and log record, the check for
# non-finite losses and gradients, the evaluation grids, the end-of-run comparison of the starting and the final
# policy (summary.json), and the toy world's measures from pixels, which no reward model can fool.
# ----------------------------------------------------------------------------------------------------------

class PhaseClock:
    """The seconds and peak GPU memory of a step's phases: clock(phase) adds the time since the last mark to it."""
    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device, self.last, self.seconds, self.peak_gb = device, None, {}, {}

    def start(self):
        if self.device.type == "cuda":  # what ran before the step (an evaluation, a save) is not the step's
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.seconds, self.peak_gb, self.last = {}, {}, time.perf_counter()

    def __call__(self, phase: str):
        if self.last is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # before reading the peak: the phase's kernels have all run
            self.peak_gb[phase] = max(torch.cuda.max_memory_allocated(self.device) / 2**30, self.peak_gb.get(phase, 0.0))
            torch.cuda.reset_peak_memory_stats(self.device)
        now = time.perf_counter()
        self.seconds[phase], self.last = self.seconds.get(phase, 0.0) + now - self.last, now


def check_finite(stats: dict, args: Config):
    """A FloatingPointError, before the update reaches the weights, if a loss term or grad_norm is not finite."""
    if not all(math.isfinite(stats[k]) for k in ("policy_loss", "kl_loss", "grad_norm") if k in stats):
        raise FloatingPointError(non_finite_advice(stats, args))


def step_record(result: dict, args: Config, clock: PhaseClock) -> dict:
    """The step's log record (README: what each metric tells), with the sampler gap: see logprob_gap_max there."""
    roll, adv_B, mb_stats = result["rollout"], result["adv_B"], result["stats"]
    gap_BL = None if roll.logp_sampler_BL is None else (roll.logp_old_BL - roll.logp_sampler_BL).abs()
    every, first = [st for stats in mb_stats for st in stats], mb_stats[0]
    later = [st for stats in mb_stats[1:] for st in stats]
    mean = lambda key, stats=every: float(np.mean([st[key] for st in stats])) if stats else None
    seconds, peak_gb = clock.seconds, clock.peak_gb
    return dict(
        reward_mean=roll.reward_B.mean().item(), reward_std=roll.reward_B.std().item(),
        **{f"{name}_{stat}": getattr(part_B, stat)().item() for name, part_B in roll.parts.items() for stat in ("mean", "std")},
        reward_group_std=roll.reward_B.view(-1, args.group_size).std(1).mean().item(),  # against --adv-eps
        adv_abs_mean=adv_B.abs().mean().item(), adv_max=adv_B.max().item(), adv_min=adv_B.min().item(),
        zero_adv_groups=(adv_B.view(-1, args.group_size) == 0).all(1).float().mean().item(),
        **{k: mean(k) for k in ("policy_loss", "kl_loss", "kl_ref", "kl_old", "ratio_mean", "clip_frac", "entropy")},
        **{f"{name}_{part}": mean(key, stats) for part, stats in (("first", first), ("later", later))
           for name, key in (("ratio", "ratio_mean"), ("clip_frac", "clip_frac"))},
        logprob_gap_max=max(st["log_ratio_max"] for st in first) if gap_BL is None else gap_BL.max().item(),
        logprob_gap_mean=mean("log_ratio_mean", first) if gap_BL is None else gap_BL.mean().item(),
        grad_norm=float(np.mean(result["grad_norms"])), diversity=group_diversity(roll.features_BD, args.group_size),
        **{f"time_{phase}": seconds.get(phase, 0.0) for phase in ("rollout", "reward", "update")},
        images_per_s=len(roll.reward_B) / sum(seconds.values()),
        peak_gpu_mem_gb=max(peak_gb.values()) if peak_gb else None,
        **{f"peak_gpu_mem_gb_{phase}": peak_gb.get(phase) for phase in ("rollout", "reward", "update")})


def non_finite_advice(stats: dict, args: Config) -> str:
    """Why an update's loss terms (or, given only grad_norm, its gradient) are not finite, and what to change."""
    gradient = "grad_norm" in stats
    gap = stats.get("log_ratio_max", 0.0)  # |log rho|: ~1e-5 before an update, < 1 after a sane one
    if args.cfg > 3 and not gap < 20:
        cause = (f"log rho reached {gap:.3g} nats and the ratio overflowed, as guidance multiplies the logits' rounding "
                 f"errors by up to 1 + cfg = {1 + args.cfg:g}: lower --cfg (now {args.cfg}; 1.5 to 3 is usual)")
    elif not gradient and not math.isfinite(stats["kl_loss"]):
        cause = (f"the k3 KL term overflowed: the policy moved too far from pi_ref. Lower --lr (now {args.lr}); a "
                 f"larger --beta would not help")
    elif not gradient:
        cause = (f"the clipped surrogate is not finite (a non-finite advantage or log-probability): lower --lr (now "
                 f"{args.lr}), and check the reward")
    else:
        cause = (f"the loss terms are finite, so the backward pass overflowed: lower --lr (now {args.lr})"
                 + (f" or --cfg (now {args.cfg}: guidance scales the logits' gradient)" if args.cfg > 3 else ""))
    return f"the {'gradient norm' if gradient else 'loss'} is not finite, so this update was not applied; {cause}"


def group_diversity(features_BD, group_size: int) -> float:
    """Mean pairwise cosine distance 1 - cos(emb_i, emb_j) within each group; near 0: collapse onto one image."""
    emb_PGD = F.normalize(features_BD.float(), dim=-1).view(-1, group_size, features_BD.shape[-1])
    sim_PGG = emb_PGD @ emb_PGD.transpose(1, 2)
    off_diagonal = sim_PGG.sum((1, 2)) - sim_PGG.diagonal(dim1=1, dim2=2).sum(1)
    return (1 - off_diagonal / (group_size * (group_size - 1))).mean().item()


def filter_top_k_top_p(logits_BlV, top_k: int = 0, top_p: float = 0.0):
    """Every logit outside the top-k and the top-p nucleus set to -inf (official sample_with_top_k_top_p_)."""
    if 0 < top_k < logits_BlV.shape[-1]:  # top-k >= V keeps every token
        cutoff_Bl1 = logits_BlV.topk(top_k, dim=-1, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < cutoff_Bl1, -torch.inf)
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1)
        drop_sorted = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[..., -1:] = False  # always keep the most likely token
        logits_BlV = logits_BlV.masked_fill(drop_sorted.scatter(-1, order_BlV, drop_sorted), -torch.inf)
    return logits_BlV


@torch.no_grad()
def compare_policies(policy: Policy, vae, reward_fn, judge, pool, heldout, args: Config, device) -> dict:
    """Did the policy change, or did the batches get lucky? measure_policies on training and held-out classes."""
    result = measure_policies(policy, vae, reward_fn, judge, spread_classes(pool, args.summary_samples, args.seed),
                              args, device, "training classes")
    if len(heldout):
        result["heldout"] = measure_policies(policy, vae, reward_fn, judge,
                                             spread_classes(heldout, args.summary_samples, args.seed), args, device,
                                             f"{len(heldout)} held-out classes")
        result["heldout"]["classes"] = heldout.tolist()
    if judge is not None:
        result["class_judge"] = judge.description
    return result


@contextmanager
def starting_policy(policy: Policy, args: Config, device: torch.device):
    """The VAR training started from: pi_ref, or where none is kept (--beta 0, full fine-tuning) reread from disk."""
    if policy.ref is None and not policy.lora:
        yield load_models(args, device)[1]
    else:
        with policy.reference() as ref:
            yield ref


def measure_policies(policy: Policy, vae, reward_fn, judge, labels, args: Config, device, what: str) -> dict:
    """Fresh samples of both policies, same classes and seeds, drawn as in training: mean reward and the standard error
    of its change (unpaired and paired), each component, diversity, class accuracy, the toy world's colour shares."""
    from tqdm import trange  # a progress bar with its estimate: --summary-samples 100000 takes a while
    n = len(labels)  # in chunks a rollout proved to fit on one process (P*G/N images under torchrun)
    chunk = args.sample_batch or args.classes_per_step * args.group_size // world_size()
    labels, seeds = labels.to(device), image_seeds(len(labels), args.seed, "summary")
    result, drawn = {}, {}  # drawn: per policy, the total reward and each component of every sample
    for name in ("start", "end"):
        with starting_policy(policy, args, device) if name == "start" else nullcontext(policy.var) as model:
            rewards, parts, features, hits, colours = [], [], [], [], []
            for i in trange(0, n, chunk, desc=f"summary: {what}, {name} policy", leave=False, dynamic_ncols=True):
                images = sample(model, vae, labels[i:i + chunk], seeds[i:i + chunk], args.cfg, args.temperature).image
                for kept, value in zip((rewards, parts, features), reward_fn(images)):  # total (B,), components, (B, D)
                    kept.append(value)
                if judge is not None:
                    hits.append(judge(images).argmax(-1) == labels[i:i + chunk])
                if args.tiny:
                    colours.append(toy_colour_of(images))
        features_BD = torch.cat(features)
        drawn[name] = {"reward": torch.cat(rewards), **{j: torch.cat([p[j] for p in parts]) for j in parts[0]}}
        per_class = [group_diversity(features_BD[labels == c], int((labels == c).sum())) for c in labels.unique()
                     if (labels == c).sum() > 1]
        result[f"diversity_{name}"] = float(np.mean(per_class)) if per_class else None
        if judge is not None:
            accuracy = torch.cat(hits).float().mean().item()
            result[f"class_accuracy_{name}"] = accuracy
            result[f"class_accuracy_se_{name}"] = math.sqrt(accuracy * (1 - accuracy) / n)  # binomial
        if args.tiny:
            colour_B = torch.cat(colours)
            result[f"colours_{name}"] = {colour: (colour_B == i).float().mean().item() for i, colour in enumerate([*TOY_COLOURS, "none"])}

    def change(key: str) -> dict:  # start and end means, the standard error of their difference, the gain in it
        before, after = drawn["start"][key], drawn["end"][key]  # one value per sample
        gain = (after.mean() - before.mean()).item()
        variance = lambda x: x.var().item() if n > 1 else float("nan")  # one sample has no variance: null in the JSON
        se = math.sqrt((variance(before) + variance(after)) / n)
        se_paired = math.sqrt(variance(after - before) / n)  # sample i of both policies: the same class and seed
        return dict(start=before.mean().item(), end=after.mean().item(), se=se, gain_in_se=gain / se if se > 0 else None,
                    se_paired=se_paired, gain_in_se_paired=gain / se_paired if se_paired > 0 else None)
    result.update({f"reward_{k}": v for k, v in change("reward").items()}, samples=n,
                  components={j: change(j) for j in drawn["start"] if j != "reward"})  # each R_j alone, unweighted
    if args.tiny:
        named = prompt_colours(args.prompt)
        if len(named) == 1:
            result.update(attribute=named[0], attribute_share_start=result["colours_start"][named[0]],
                          attribute_share_end=result["colours_end"][named[0]])
        else:
            result["attribute_note"] = ("the prompt names " + (f"{len(named)} toy colours ({', '.join(named)})" if named else
                                        "no toy colour") + ", not one: colours_start / colours_end hold every share")
    result = json.loads(json.dumps(result), parse_constant=lambda nan_or_inf: None)  # every number finite, or null
    num = lambda key, spec: "n/a" if result.get(key) is None else format(result[key], spec)
    line = (f"{n} fresh samples of {what}, starting vs final policy: reward {num('reward_start', '.4f')} -> "
            f"{num('reward_end', '.4f')} (+- {num('reward_se', '.4f')}, a change of {num('reward_gain_in_se', '.1f')} "
            f"standard errors; paired by class and seed {num('reward_gain_in_se_paired', '.1f')})")
    if "attribute" in result:
        line += f"; {result['attribute']} shapes {result['attribute_share_start']:.1%} -> {result['attribute_share_end']:.1%}"
    if judge is not None:
        line += f"; class accuracy {num('class_accuracy_start', '.1%')} -> {num('class_accuracy_end', '.1%')}"
    print(line)
    return result


def spread_classes(pool, n: int, seed: int):
    """n labels over the pool: each class equally often when n >= len(pool), else a seeded random n of them."""
    if n >= len(pool):
        return pool[torch.arange(n) % len(pool)]
    return pool[torch.randperm(len(pool), generator=generator(seed, "spread"))[:n]]


class ClipClassJudge(nn.Module):
    """Class fidelity at full size: CLIP zero-shot over open_clip's ImageNet names and templates (the reward's CLIP)."""
    description = ("CLIP zero-shot over open_clip's 1000 ImageNet class names and its 7 simple templates; the reward's "
                   "own CLIP, so not independent of what was optimised")

    def __init__(self, clip_model, tokenizer, class_names, templates, device: torch.device):
        super().__init__()
        self.clip = clip_model
        texts = [template(name) for name in class_names for template in templates]  # 7,000: seconds on a GPU
        with torch.no_grad():
            emb = torch.cat([self.clip.encode_text(tokenizer(texts[i:i + 1000]).to(device)).float()
                             for i in range(0, len(texts), 1000)])
        per_template = F.normalize(emb, dim=-1).view(len(class_names), len(templates), -1)  # (classes, templates, D)
        self.register_buffer("class_emb", F.normalize(per_template.mean(1), dim=-1))  # (classes, D)

    @torch.no_grad()
    def forward(self, images_B3HW):
        """Class scores (B, num_classes) of images in [0, 1]."""
        with autocast(images_B3HW.device):
            features_BD = F.normalize(self.clip.encode_image(clip_input(self.clip, images_B3HW)).float(), dim=-1)
        return features_BD @ self.class_emb.T


# The toy world's colours (RGB): the 8 of the palette that VAR is pretrained on (hues 0, 30, 60, 120, 180, 240, 270
# and 300 degrees at saturation 0.85, value 0.9), then 3 that only the tokenizer and the toy CLIP ever saw.
TOY_COLOURS = {"red": (0.9, 0.135, 0.135), "orange": (0.9, 0.5175, 0.135), "yellow": (0.9, 0.9, 0.135),
               "green": (0.135, 0.9, 0.135), "cyan": (0.135, 0.9, 0.9), "blue": (0.135, 0.135, 0.9),
               "purple": (0.5175, 0.135, 0.9), "pink": (0.9, 0.135, 0.9),
               "white": (0.95, 0.95, 0.95), "lime": (0.5175, 0.9, 0.135), "brown": (0.6, 0.3429, 0.15)}
TOY_PALETTE = tuple(TOY_COLOURS)[:8]


def shape_colour(images_B3HW):
    """The median colour of each toy shape's pixels wholly inside its silhouette (no edge blends in); NaN: no shape. (B, 3)"""
    inner_B1HW = shape_mask(images_B3HW) >= 0.999
    return images_B3HW.float().masked_fill(~inner_B1HW, float("nan")).flatten(2).nanmedian(dim=2).values


def toy_colour_of(images_B3HW, within: float = 0.2):
    """Each toy shape's colour from pixels: the nearest TOY_COLOURS index, or 'none' beyond `within`. (B,)"""
    colour_B3 = shape_colour(images_B3HW)
    distance = torch.cdist(colour_B3, torch.tensor(list(TOY_COLOURS.values()), device=images_B3HW.device))  # (B, colours)
    return torch.where(distance.min(1).values <= within, distance.argmin(1), len(TOY_COLOURS))


def prompt_colours(prompt: str) -> List[str]:
    """The toy colours a prompt names, as whole words: "a white shape" -> ["white"]."""
    words = "".join(ch if ch.isalpha() else " " for ch in prompt.lower()).split()
    return [name for name in TOY_COLOURS if name in words]


class ShapeJudge(nn.Module):
    """The toy world's judge: a CNN that names the shape from its silhouette alone, so colour cannot fool it."""
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 32 -> 16 px
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 -> 8 px
                                 nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                 nn.Linear(64, num_classes))

    def forward(self, images_B3HW):
        """Class logits (B, num_classes) of images in [0, 1]."""
        return self.net(shape_mask(images_B3HW) * 2 - 1)


def load_judge(args: Config, device: torch.device, reward_fn: Optional[Reward] = None) -> Optional[nn.Module]:
    """What names a sample's class: the toy ShapeJudge (--tiny), ClipClassJudge (if the reward runs CLIP), or None."""
    if args.tiny:
        with torch.device("meta"):
            judge = ShapeJudge(TOY_ARCH["num_classes"])
        judge = load_toy(judge, "judge.pth").to(device).eval().requires_grad_(False)
        judge.description = "the toy world's ShapeJudge: a CNN that names the shape from its silhouette alone"
        return judge
    if reward_fn is None or reward_fn.clip is None:
        return None
    import open_clip
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES
    return ClipClassJudge(reward_fn.clip, open_clip.get_tokenizer(args.clip_model), IMAGENET_CLASSNAMES,
                          SIMPLE_IMAGENET_TEMPLATES, device)


# ----------------------------------------------------------------------------------------------------------
# D. The run directory: the Run around train()'s loop, which checks everything first; image grids and a reward curve
# a person looks at, checkpoints that survive a full disk, one run per directory, what a resumed run must match, Ctrl-C.
# ----------------------------------------------------------------------------------------------------------

class Run:
    """A run of train(), around its loop: `with Run(args).begin()` checks every setting and path first, joins torchrun's
    processes (appendix H), locks --out, opens the checkpoint; steps, record and finish do the rest (rank 0 writes)."""
    def __init__(self, args: RunConfig):
        check_config(args)
        self.args, self.out, self.loop, self.stop, self.stopping, self.at_step = args, out_dir(args), None, [], False, 0

    @contextmanager
    def begin(self):
        args, out = self.args, self.out
        with torchrun_processes(resolve_device(args.device)) as (self.ranks, self.device):
            self.clock = PhaseClock(self.device)
            if self.ranks.main:
                check_writable(out, "--out")
            if not args.tiny and "aesthetic" in parse_reward_spec(args.reward) and not args.aesthetic_ckpt:
                check_writable(cache_dir(args), "--cache-dir" if args.cache_dir else "the cache ($VAR_GRPO_CACHE or ~/.cache/var_grpo)")
            with run_lock(out) if self.ranks.main else nullcontext():
                self.ck = open_checkpoint(args, out, self.device)
                self.ranks.barrier()  # torchrun: every process has read --out before the first one writes into it
                if args.tiny:
                    print(f"--tiny: the toy world on {args.device}" + (f", {self.ranks.world} processes" if self.ranks.world > 1
                          else "") + f": VAR-d{TOY_DEPTH} pretrained on 32 px shapes of 8 colours; the toy CLIP knows {', '.join(TOY_COLOURS)}")
                try:
                    with redirect_stdout(SilentWhenGone(sys.stdout)), redirect_stderr(SilentWhenGone(sys.stderr)):
                        with failures_keep_checkpoints(out, args, lambda: self.at_step):  # what to do, what is kept
                            yield self
                finally:
                    if self.loop is not None:
                        self.loop.close()  # puts the signal handlers back now, not whenever the loop is collected

    def steps(self, policy: Policy, vae: VQVAE, reward_fn: Reward, opt, pool):
        """The steps to run: from 0, or from the checkpoint's step with model, optimizer and metrics restored."""
        args, ranks, var = self.args, self.ranks, policy.var
        self.policy, self.opt, self.vae, self.reward_fn = policy, opt, vae, reward_fn
        self.eval_labels = spread_classes(pool, args.num_eval, args.seed).to(self.device)
        start, self.records, self.base_sha256 = 0, [], base_fingerprint(args)
        if self.ck is not None:
            check_same_base(self.ck.get("base_sha256", self.base_sha256), self.base_sha256, args)
            var.load_state_dict(self.ck["model"], strict=args.lora_rank == 0)  # LoRA: the adapters; the base is on disk
            opt.load_state_dict(self.ck["optimizer"])
            start, self.records = self.ck["step"], self.ck["records"]
            print(f"resumed {self.out} at step {start}")
        if ranks.main:
            write_text(self.out / "config.json", json.dumps(vars(args), indent=1))
            write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))
            if start == 0:
                print(f"step 0 evaluation reward {self.evaluate(0):.4f}")
        self.loop = self.step_loop(start)
        return self.loop

    def step_loop(self, start: int):
        from tqdm import trange
        with signals_stop_after_the_step() as self.stop:
            for step in trange(start, self.args.steps, initial=start, total=self.args.steps, desc="GRPO",
                               dynamic_ncols=True, disable=not self.ranks.main):
                self.clock.start()
                self.at_step = step
                yield step
                if self.stopping:
                    return

    def evaluate(self, step: int) -> float:
        """Images at fixed (class, seed) pairs saved as the grid eval_step{step}.png; their mean reward."""
        args, seeds = self.args, image_seeds(len(self.eval_labels), self.args.seed, "eval")
        drawn = sample_in_chunks(self.policy.var, self.vae, self.eval_labels, seeds, args.sample_batch,
                             args.cfg if args.eval_cfg < 0 else args.eval_cfg, args.temperature, args.eval_top_k, args.eval_top_p)
        save_grid(drawn.image, self.out / f"eval_step{step:05d}.png")
        return self.reward_fn(drawn.image)[0].mean().item()

    def record(self, step: int, result: dict):
        """After a step: its record logged, a grid and a checkpoint when --eval-every, --save-every or a signal say."""
        args, ranks = self.args, self.ranks
        self.clock("update")
        self.clock.last = None  # stopped: what follows (an evaluation, a save) is not the step's
        rec = dict(step=step, **step_record(result, args, self.clock))
        self.done = step + 1
        self.stopping = ranks.any(bool(self.stop))  # torchrun: a signal to any process stops them all after this step
        if ranks.main:
            if self.done % args.eval_every == 0 or self.done == args.steps:  # the policy after this step's update
                rec["eval_reward"] = self.evaluate(self.done)
            self.records.append(rec)
            log_step(self.records, self.out / "metrics.jsonl", args)
            if self.done % args.save_every == 0 or self.done == args.steps or self.stopping:
                atomic_save(dict(model=trained_state_dict(self.policy.var, args), optimizer=self.opt.state_dict(),
                                 step=self.done, config=vars(args), base_sha256=self.base_sha256,
                                 records_sha256=hashlib.sha256(json.dumps(self.records).encode()).hexdigest()),
                            self.out / "checkpoint.pt")

    def finish(self, policy: Policy, vae: VQVAE, reward_fn: Reward, pool, heldout) -> dict:
        """On the first process: summary.json (unless stopped), var_final.pth (LoRA merged), the pictures."""
        args, out, summary = self.args, self.out, None
        stopped = (self.stop[0] if self.stop else "a signal to another process") if self.stopping else None
        if not self.ranks.main:
            self.ranks.barrier()  # until process 0 has written the run's files: a next run may read them
            return dict(out=out, records=[], var=policy.var, summary=None, stopped=stopped)
        if stopped:
            print(f"stopped by {stopped} after step {self.done}, checkpoint saved: continue with the same command and --resume")
        elif self.records and args.summary_samples > 0:
            judge = load_judge(args, self.device, reward_fn)
            summary = compare_policies(policy, vae, reward_fn, judge, pool, heldout, args, self.device)
        atomic_save(export_state_dict(policy.var, args, self.base_sha256), out / "var_final.pth")
        if summary is not None:
            write_text(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False) + "\n")
        first, last = out / "eval_step00000.png", out / f"eval_step{args.steps:05d}.png"
        try:  # the pictures last: the weights and the numbers are already written
            if self.records:
                save_reward_curve(self.records, out / "reward_curve.png")
                if first.exists() and last.exists():
                    save_before_after(first, last, out / "before_after.png")
        except Exception as e:
            print(f"warning: a picture could not be drawn ({type(e).__name__}: {str(e)[:200]}); the rest is written", file=sys.stderr)
        grids = sorted(out.glob("eval_step*.png"))
        written = [p.name for p in sorted(out.iterdir()) if p.suffix in (".json", ".jsonl", ".png", ".pth", ".pt") and p not in grids]
        print(f"outputs in {out}: {', '.join(written)}" + (f", {len(grids)} evaluation grids eval_step*.png" if grids else ""))
        self.ranks.barrier()
        return dict(out=out, records=self.records, var=policy.var, summary=summary, stopped=stopped)


def check_same_base(old: dict, now: dict, args: Config):
    """A resumed run, and the LoRA merge at its end, must start from the base weight files it started from."""
    changed = [name for name in old if old[name] != now.get(name)]
    if changed:
        raise WeightsError("the base weights changed since the run started: " + ", ".join(
            f"{base_weight_files(args)[n]} (sha256 {now[n][:12]}..., was {old[n][:12]}...)" for n in changed)
            + "; restore the original file(s), or start a new run (the adapters of a LoRA run are in its checkpoint.pt)")


@contextmanager
def errors_as_messages(args: RunConfig):
    """Bad input, an unwritable file, a failed download, a non-finite update or no memory: one line, not a traceback."""
    try:
        yield
    except (ValueError, OSError, WeightsError, FloatingPointError, MemoryError) as e:  # OSError: a file could not be written
        raise SystemExit(f"error{which_process()}: {e}") from None
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C during it
        if not args.bench:
            print(f"\nstopped at once by Ctrl-C; checkpoints already in {out_dir(args)} are kept (--resume continues "
                  f"from the last one)", file=sys.stderr)
        raise SystemExit(130) from None


def trained_state_dict(var: VAR, args: Config) -> dict:
    """What a checkpoint must hold to resume: the whole model, or with LoRA only the adapters (the base is on disk)."""
    sd = var.state_dict()
    return sd if args.lora_rank == 0 else {k: v for k, v in sd.items() if ".lora_" in k}


def export_state_dict(var: VAR, args: Config, base_sha256: dict) -> dict:
    """var's weights with the official key names; LoRA: W + W_up W_down merged onto the fp32 base from disk."""
    if args.lora_rank == 0:
        return var.state_dict()
    check_same_base(base_sha256, base_fingerprint(args), args)
    merged = load_models(args, torch.device("cpu"))[1].state_dict()
    for name, m in var.named_modules():
        if isinstance(m, LoRALinear):
            merged[name + ".weight"] += (m.lora_up.detach().float() @ m.lora_down.detach().float()).cpu()
    return merged


def save_grid(images_B3HW, path: Path, columns: int = 4):
    """Images in [0, 1] as a PNG grid; small (toy) images are enlarged to >= 128 px with visible pixels."""
    from PIL import Image
    images_B3HW = F.interpolate(images_B3HW.float(), scale_factor=max(1, 128 // images_B3HW.shape[-1]), mode="nearest")
    B, _, H, W = images_B3HW.shape
    rows = math.ceil(B / columns)
    grid = torch.ones(3, rows * H, columns * W)
    for i, img in enumerate(images_B3HW.float().cpu()):
        grid[:, (i // columns) * H:(i // columns + 1) * H, (i % columns) * W:(i % columns + 1) * W] = img
    save_png(Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()), path)


def save_before_after(before: Path, after: Path, path: Path):
    """The first and the last evaluation grid side by side, each under a label large enough to read at a glance."""
    from PIL import Image, ImageDraw, ImageFont
    a, b = Image.open(before), Image.open(after)
    header = 48
    canvas = Image.new("RGB", (a.width + b.width + 16, max(a.height, b.height) + header), "white")
    canvas.paste(a, (0, header))
    canvas.paste(b, (a.width + 16, header))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=36)  # a scalable font: Pillow >= 10.1
    step = lambda p: int(p.stem.removeprefix("eval_step"))
    draw.text((6, 4), f"before: step {step(before)}", fill="black", font=font)
    draw.text((a.width + 22, 4), f"after: step {step(after)}", fill="black", font=font)
    save_png(canvas, path)


def save_reward_curve(records: List[dict], path: Path, width: int = 640, height: int = 360):
    """Mean reward per step with a +-1 std band, drawn with PIL (matplotlib is not a runtime dependency)."""
    from PIL import Image, ImageDraw
    steps = [r["step"] for r in records]
    mean = np.array([r["reward_mean"] for r in records])
    std = np.array([r["reward_std"] for r in records])
    lo, hi = float((mean - std).min()), float((mean + std).max())
    hi = hi if hi > lo else lo + 1e-6
    pad = 50
    x = lambda s: pad + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (width - 2 * pad)
    y = lambda v: height - pad - (v - lo) / (hi - lo) * (height - 2 * pad)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    band = [(x(s), y(m + d)) for s, m, d in zip(steps, mean, std)] + [(x(s), y(m - d)) for s, m, d in reversed(list(zip(steps, mean, std)))]
    if len(steps) > 1:
        draw.polygon(band, fill=(200, 220, 255))
        draw.line([(x(s), y(m)) for s, m in zip(steps, mean)], fill=(20, 60, 200), width=2)
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    draw.text((pad, pad - 20), "reward (mean +- std over the step's images)", fill="black")
    draw.text((4, pad), f"{hi:.4g}", fill="black")
    draw.text((4, height - pad - 10), f"{lo:.4g}", fill="black")
    draw.text((pad, height - pad + 8), f"step {steps[0]}", fill="black")
    draw.text((width - pad - 60, height - pad + 8), f"step {steps[-1]}", fill="black")
    save_png(img, path)


def refuse_odd_file(path: Path):
    """A symbolic link planted in --out aims anywhere, a hard link is another run's file too, a FIFO blocks the run."""
    st = os.lstat(path) if os.path.lexists(path) else None
    if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink > 1):
        what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file (a FIFO, a device, a folder?)"
                if not stat.S_ISREG(st.st_mode) else f"one of {st.st_nlink} hard links to one file (a `cp -al` copy?)")
        raise ValueError(f"{path} is {what}, which this script never writes through: replace it by a copy or remove it")


def open_to_write(path: Path, mode: str = "w"):
    """open(path, mode) for writing, refusing what refuse_odd_file refuses; "x": only a file it creates itself."""
    refuse_odd_file(path)
    flags = os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # (a link or FIFO put there since)
    flags |= {"w": os.O_TRUNC, "a": os.O_APPEND, "x": os.O_EXCL}[mode[0]] | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    return os.fdopen(os.open(path, flags, 0o644), mode.replace("x", "w"))


def write_text(path: Path, text: str):
    with open_to_write(path, "w") as f:
        f.write(text)


def save_png(image, path: Path):
    with open_to_write(path, "wb") as f:
        image.save(f, format="PNG")


def atomic_save(obj, path: Path):
    """Write to path.tmp, fsync, rename over path: a crash or a full disk mid-write leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a .tmp left by a crash, or a link planted there: removed, never written through
        with open_to_write(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # (a link at path is replaced, not followed)
    except (OSError, RuntimeError) as e:
        import errno
        code, free = getattr(e, "errno", None), shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
        if code == errno.ENOSPC or (free is not None and free < 1 << 26):  # torch's zip writer hides ENOSPC
            why = "the disk is full" + (f" ({free / 2**20:.0f} MB free)" if free is not None else "")
        else:
            why = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied"}.get(code, f"{type(e).__name__}: {e}")
        kept = f" The previous {path.name} is intact." if path.exists() else ""
        raise OSError(f"could not write {path}: {why}.{kept} Free some space, then continue with --resume.") from None
    finally:  # also on a second Ctrl-C mid-write
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


# What a resumed run may change: how long it runs, how often it saves and evaluates, and how it uses the machine.
# Anything else would silently not apply (the optimizer keeps its learning rate) or change the experiment midway.
RESUME_MAY_CHANGE = ("steps", "eval_every", "save_every", "summary_samples", "device", "micro_batch", "sample_batch",
                     "grad_checkpointing", "compile", "cache_dir")
# What a run writes into --out; a new run refuses an --out that holds any of them without a checkpoint to resume.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "var_final.pth", "before_after.png", "reward_curve.png",
             "eval_step00000.png")


def out_dir(args: Config) -> Path:
    """--out, else runs/<prompt>-d<depth> (runs/tiny-<prompt>-<reward>), cut to 60 characters plus a hash when longer."""
    if args.out:
        return Path(args.out)
    name = f"tiny-{args.prompt}-{args.reward}" if args.tiny else f"{args.prompt}-d{args.depth}"
    slug = "-".join(filter(None, "".join(ch if ch.isalnum() else "-" for ch in name.lower()).split("-")))
    if len(slug) > 60:
        slug = slug[:60].rstrip("-") + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return Path("runs") / slug


@contextmanager
def run_lock(out: Path):
    """One run per --out: an exclusive lock on out/.lock (released however the process ends) holding its process id."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    lock, written = out / ".lock", lambda: [(out / n).stat().st_mtime_ns for n in RUN_FILES if (out / n).exists()]
    created, before = not os.path.lexists(lock), written()
    with open_to_write(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ValueError(f"{out} is in use by another run (process {f.read().strip() or 'unknown'}); choose another --out") from None
        except (OSError, AttributeError) as e:
            print(f"warning: cannot lock {out / '.lock'} ({getattr(e, 'strerror', None) or 'no fcntl'}): use {out} for one run only",
                  file=sys.stderr)
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            if created and written() == before:  # refused, or ended before writing: nothing of this attempt is left
                lock.unlink(missing_ok=True)


STUCK_STEPS = 5  # steps in a row with every advantage 0 before log_step warns


def log_step(records: List[dict], metrics_path: Path, args: Config):
    """The last record as a line of metrics.jsonl and a line for a person; a warning after STUCK_STEPS zero-advantage steps."""
    rec = records[-1]
    with open_to_write(metrics_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    from tqdm import tqdm
    tqdm.write(f"step {rec['step']:4d} | reward {rec['reward_mean']:.4f} +- {rec['reward_std']:.4f} | kl_ref {rec['kl_ref']:.2e} | "
               f"clip {rec['clip_frac']:.3f} | ratio {rec['ratio_mean']:.4f} | gap {rec['logprob_gap_max']:.1e} | "
               f"ent {rec['entropy']:.3f} | grad {rec['grad_norm']:.3f} | div {rec['diversity']:.3f} | "
               f"{rec['time_rollout'] + rec['time_reward'] + rec['time_update']:.2f}s (rollout {rec['time_rollout']:.2f} "
               f"reward {rec['time_reward']:.2f} update {rec['time_update']:.2f})"
               + (f" | eval reward {rec['eval_reward']:.4f}" if "eval_reward" in rec else ""))
    recent = records[-STUCK_STEPS:] if len(records) >= STUCK_STEPS and rec["step"] % STUCK_STEPS == STUCK_STEPS - 1 else []
    if recent and all(r.get("zero_adv_groups") == 1 for r in recent):
        tqdm.write(f"warning: in each of the last {STUCK_STEPS} steps every group's images got the same reward, so every "
                   f"advantage was 0 and nothing was learned: raise --temperature (now {args.temperature}) or "
                   f"--group-size, or choose a reward that varies (--reward {args.reward})", file=sys.stderr)
    elif recent and args.adv_norm != "none" and all(r.get("reward_group_std", 1.0) < args.adv_eps for r in recent):
        tqdm.write(f"warning: in each of the last {STUCK_STEPS} steps the reward's spread within a group (std "
                   f"{rec['reward_group_std']:.2g}) was below --adv-eps {args.adv_eps:g}, so the advantages shrank to "
                   f"{rec['adv_abs_mean']:.2g}: scale the weights of --reward {args.reward} up, or lower --adv-eps", file=sys.stderr)


@contextmanager
def signals_stop_after_the_step():
    """A list to which the first Ctrl-C, SIGTERM or SIGHUP appends its name: the loop finishes the step, saves and
    stops. One process puts the old handlers back at once, so a second signal acts at once; ignored ones stay so."""
    stop = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    signums = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {signum: signal.getsignal(signum) for signum in signums if signal.getsignal(signum) is not signal.SIG_IGN}

    def put_back():
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def on_signal(signum, frame):
        stop.append("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)
        if len(stop) > 1:  # torchrun: its copy of the first signal
            return
        if world_size() == 1:
            put_back()
        with suppress(Exception):  # a stop must not depend on a terminal that may have hung up (EIO), nor on a print
            print(f"\n{stop[0]}: finishing this step, then saving and stopping" + (" (Ctrl-C again stops at once)" if
                  world_size() == 1 else " (torchrun kills the processes after --shutdown-timeout, 30 s by default)"), flush=True)
    for signum in previous:
        signal.signal(signum, on_signal)
    try:
        yield stop
    finally:
        put_back()


def exit_status(result) -> int:
    """0 for a run that ended; 128 + the signal's number (as a shell reports it) for one a signal stopped early."""
    stopped = result.get("stopped") if isinstance(result, dict) else None
    signum = getattr(signal, {"Ctrl-C": "SIGINT"}.get(stopped, stopped), None) if stopped else None  # None: another's
    return 0 if not stopped else 1 if signum is None else 128 + int(signum)


class SilentWhenGone:
    """stdout or stderr that goes silent instead of raising once no one reads it (`| head`, a closed terminal)."""
    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str):
        return self.guarded(self.stream.write, text) or len(text)

    def flush(self):
        self.guarded(self.stream.flush)

    def guarded(self, call, *text):
        try:
            return call(*text)
        except UnicodeEncodeError as e:  # a terminal that cannot show a character: the line, with "?" for it
            return call(*(t.encode(e.encoding, "replace").decode(e.encoding) for t in text))
        except (OSError, ValueError):
            try:  # what is still buffered, and Python's own flush at exit, now go to /dev/null
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            except (OSError, ValueError):
                self.stream = open(os.devnull, "w")

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextmanager
def failures_keep_checkpoints(out: Path, args: Config, at_step):
    """Out of memory (GPU or CPU), a non-finite update, a reward of one's own that failed: what to do, what is kept."""
    kept = lambda: (f"Checkpoints already written in {out} are kept (--resume continues from the last one)." if
                    (out / "checkpoint.pt").exists() else f"No checkpoint had been written in {out} yet.")
    lower = "Lower --micro-batch (an update's memory), --sample-batch (sampling's), add --grad-checkpointing"
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise torch.cuda.OutOfMemoryError(
            f"{e}\nOut of GPU memory. {lower}, or train LoRA adapters with --lora-rank 16. {kept()}") from None
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "can't allocate memory" not in str(e) and "not enough memory" not in str(e):
            raise
        raise MemoryError(f"out of CPU memory ({str(e)[:200]}). {lower}. {kept()}") from None
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}. {kept()}") from None
    except ValueError as e:  # a reward of one's own raised, or returned the wrong shape
        raise ValueError(f"{e}, at step {at_step()}. {kept()}") from None


def open_checkpoint(args: Config, out: Path, device: torch.device) -> Optional[dict]:
    """None for a new run; with --resume the checkpoint, checked before any model is loaded or file rewritten."""
    path, again = out / "checkpoint.pt", "or start the run again in another --out"
    for run_file in [out / name for name in RUN_FILES + ("checkpoint.pt",)] + sorted(out.glob("eval_step*.png")):
        refuse_odd_file(run_file)  # before any work (a FIFO would block the run at the end, and a resume at once)
    if not args.resume:
        if path.exists():
            raise FileExistsError(f"{out} already holds a run (checkpoint.pt); pass --resume to continue it or choose another --out")
        others = [name for name in RUN_FILES if (out / name).exists()]
        if others:
            raise FileExistsError(f"{out} holds another run's files ({', '.join(others)}) but no checkpoint.pt to "
                                  f"resume; choose another --out, or move those files away")
        return None
    if not path.exists():
        metrics = out / "metrics.jsonl"
        logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        raise FileNotFoundError(f"--resume: there is no {path}; " + (f"the run logged {logged} step(s) but stopped "
                                f"before its first checkpoint: start it again without --resume" if logged else
                                "point --out at the run to continue"))
    try:  # weights_only: tensors and plain containers only, so that a planted file cannot run code
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"--resume: {path} holds objects that torch.load(weights_only=True) refuses to unpickle "
                         f"({first_line(e)}), as unpickling could run code; {again}") from None
    except Exception as e:
        raise ValueError(f"--resume: {path} cannot be read ({type(e).__name__}: {str(e)[:200]}): it is damaged; "
                         f"restore it from a backup, {again}") from None
    old = ck.get("config") if isinstance(ck, dict) else None  # not a dict: checkpoint_problems says so below
    fixed = [k for k in vars(args) if k not in RESUME_MAY_CHANGE + ("out", "resume", "bench")]
    differs = [k for k in fixed if isinstance(old, dict) and old.get(k, getattr(RunConfig, k)) != getattr(args, k)]
    if differs:
        raise ValueError(f"--resume: {path} was trained with different settings: " + ", ".join(
            f"--{k.replace('_', '-')} was {old.get(k, getattr(RunConfig, k))!r}, now {getattr(args, k)!r}" for k in differs)
            + f". Give the original values (in {out / 'config.json'}), {again}; only these may change: "
            + ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE))
    problems = checkpoint_problems(ck, args, device)  # after the settings: a changed setting is the clearer message
    if problems:
        raise ValueError(f"--resume: {path} is not a checkpoint this run can continue: {'; '.join(problems)}. Restore "
                         f"it from a backup, {again}.")
    if args.steps < ck["step"]:
        raise ValueError(f"--resume --steps {args.steps}: {path} is already at step {ck['step']}; give --steps "
                         f"{ck['step']} or more")
    ck["records"] = read_metrics(out / "metrics.jsonl", ck["step"])
    logged, digest = [r["step"] for r in ck["records"]], hashlib.sha256(json.dumps(ck["records"]).encode()).hexdigest()
    if logged != list(range(ck["step"])) or ck.get("records_sha256", digest) != digest:  # the checkpoint's own log?
        raise ValueError(f"--resume: {path} is at step {ck['step']}, but {out / 'metrics.jsonl'} records steps "
                         f"{logged[:3]}{' ...' if len(logged) > 3 else ''} where 0..{ck['step'] - 1} belong (or another "
                         f"run's steps): they are not one run's; put that run's own files together, {again}")
    return ck


def checkpoint_problems(ck, args: Config, device: torch.device) -> List[str]:
    """What keeps ck from being resumed: missing entries, wrong types, model keys or shapes (on the meta device)."""
    if not isinstance(ck, dict):
        return [f"it holds a {type(ck).__name__}, not a dict"]
    want = {"model": dict, "optimizer": dict, "step": int, "config": dict}
    problems = [f"{key} is missing" if key not in ck else f"{key} is a {type(ck[key]).__name__}, not a {kind.__name__}"
                for key, kind in want.items() if not isinstance(ck.get(key), kind)]
    if problems:
        return problems
    with torch.device("meta"):
        model = build_var(TOY_ARCH if args.tiny else OFFICIAL_ARCH, TOY_DEPTH if args.tiny else args.depth)
        if args.lora_rank > 0:
            add_lora(model, args.lora_rank)
    return [f"model {p}" for p in key_problems(trained_state_dict(model, args), ck["model"])] + (
        [f"its step is {ck['step']}"] if ck["step"] < 0 else [])


def read_metrics(path: Path, before_step: int) -> List[dict]:
    """metrics.jsonl's records for steps < before_step; a torn last line dropped, a damaged one an error."""
    lines, records = path.read_text().splitlines() if path.is_file() else [], []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"warning: the last line of {path} is incomplete (the run was stopped while writing it); "
                      f"dropped", file=sys.stderr)
                break
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {i + 1}, is not a step's record (a JSON object with an integer \"step\"): "
                             f"{line[:60]!r}; repair or delete that line, then --resume again")
        records.append(record)
    return [r for r in records if r["step"] < before_step]


# ----------------------------------------------------------------------------------------------------------
# E. Speed and memory: LoRA adapters (--lora-rank), rollouts in chunks (--sample-batch), frozen weights in bf16, and
# on a GPU the teacher-forced pass compiled (--compile) and recomputed in the backward pass (--grad-checkpointing).
# ----------------------------------------------------------------------------------------------------------

DECODE_BATCH = 8  # images per decoder pass in `sample`: its full-resolution activations dominate the sampler's memory


def autocast(device: torch.device):
    """bf16 autocast on GPU (as the official code runs), plain fp32 on CPU (exact parity)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class LoRALinear(nn.Module):
    """y = x W^T + b + (x W_down^T) W_up^T: a frozen linear (W, b; its keys kept) plus a trained low-rank update, with
    W_down: (rank, in), W_up: (out, rank) starting at zero, so the adapted model starts as the base; alpha = rank."""
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        bound = 1 / math.sqrt(base.in_features)  # W_down as nn.Linear initialises its weights, W_up = 0 (as in the paper)
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device).uniform_(-bound, bound))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.adapters_on = True

    def forward(self, x, bias=None):  # bias: the attention passes its q/v biases to the adapted QKVLinear
        y = F.linear(x, self.weight, self.bias if bias is None else bias)
        return y + F.linear(F.linear(x, self.lora_down), self.lora_up) if self.adapters_on else y


def add_lora(var: VAR, rank: int) -> VAR:
    """Freeze var and give the four linears of every block rank-`rank` adapters, the only trainable weights."""
    var.requires_grad_(False)
    for block in var.blocks:
        for module, name in ((block.attn, "mat_qkv"), (block.attn, "proj"), (block.ffn, "fc1"), (block.ffn, "fc2")):
            setattr(module, name, LoRALinear(getattr(module, name), rank))
    return var


@contextmanager
def adapters_off(var: VAR):
    """var with its LoRA adapters switched off: the base model, pi_ref."""
    adapters = [m for m in var.modules() if isinstance(m, LoRALinear)]
    for m in adapters:
        m.adapters_on = False
    try:
        yield var
    finally:
        for m in adapters:
            m.adapters_on = True


def sample_in_chunks(var: VAR, vae: VQVAE, label_B, seed_B, chunk: int, *args, **kwargs) -> Sample:
    """`sample` in chunks of `chunk` images (0: all): the KV cache holds one chunk; each image draws from its own seed."""
    chunk = chunk or len(label_B)
    parts = [sample(var, vae, label_B[i:i + chunk], seed_B[i:i + chunk], *args, **kwargs) for i in range(0, len(label_B), chunk)]
    if len(parts) == 1:
        return parts[0]
    return Sample([torch.cat(maps) for maps in zip(*(p.tokens for p in parts))], torch.cat([p.image for p in parts]),
                  torch.cat([p.logp_BL for p in parts]) if parts[0].logp_BL is not None else None)


def frozen_linears_to_bf16(model: VAR):
    """Frozen linear weights in bf16, which autocast rounds them to anyway: the same outputs, half the memory."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, LoRALinear)) and name != "word_embed":
            for p in (m.weight, m.bias):
                if p is not None and not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)


def use_the_device(args: RunConfig, device: torch.device, policy: Policy):
    """The speed and memory settings for the VAR and pi_ref's copy; Module.compile compiles forward alone."""
    models = [policy.var] + ([policy.ref] if policy.ref is not None else [])
    for model in (models[-1:] if device.type == "cuda" else []):  # pi_ref's copy, or the VAR (only LoRA's base is frozen)
        frozen_linears_to_bf16(model)
    policy.var.grad_checkpointing = args.grad_checkpointing  # the reference needs no backward pass
    for model in models if args.compile and device.type == "cuda" and can_compile() else []:
        model.compile()


def can_compile() -> bool:
    """--compile needs triton and an inductor that rounds to bf16 as eager autocast does; it turns that on."""
    import torch._inductor.config as inductor_config
    try:
        from torch.utils._triton import has_triton
        usable = has_triton() and hasattr(inductor_config, "emulate_precision_casts")
    except ImportError:
        usable = False
    if not usable:
        print(f"note: --compile needs triton and a recent torch (this is torch {torch.__version__}): the VAR runs "
              f"eagerly, as with --no-compile (the same method, slower)", file=sys.stderr)
        return False
    inductor_config.emulate_precision_casts = True
    return True


# ----------------------------------------------------------------------------------------------------------
# F. Benchmark (--bench): whole GRPO steps with random weights at any depth, timed by the step's own record (the
# PhaseClock's phases, as train() logs them, the same flags). MFU: the update's matmul FLOPs against a measured matmul.
# ----------------------------------------------------------------------------------------------------------

def matmul_tflops(device: torch.device) -> float:
    """Measured dense matmul throughput, bf16 on a GPU (fp32 on a CPU): the denominator of MFU."""
    n, repeats = (8192, 20) if device.type == "cuda" else (1024, 3)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    clock = PhaseClock(device)
    a @ a
    clock.start()
    for _ in range(repeats):
        a @ a
    clock("matmul")
    return 2 * n ** 3 * repeats / clock.seconds["matmul"] / 1e12


def update_flops(var: VAR, args: RunConfig, n_images: int) -> float:
    """Model FLOPs of a step's update: every teacher-forced pass's matmuls (2 per weight and token forward, 4 more
    backward, 2 with LoRA's frozen weights) and attention over all L x L pairs, both CFG branches."""
    block_weights = sum(m.weight.numel() for b in var.blocks for m in (b.attn.mat_qkv, b.attn.proj, b.ffn.fc1, b.ffn.fc2))
    forward = 2 * var.L * (block_weights + var.C * var.V) + 4 * var.L ** 2 * var.C * var.depth  # one sequence
    passes = args.inner_epochs * (3 if args.lora_rank == 0 else 2)  # the no-grad passes belong to the rollout
    return n_images * (1 if args.cfg == 0 else 2) * forward * passes


def benchmark(args: RunConfig, repeats: int = 3) -> dict:
    """`repeats` GRPO steps after one that warms up (and compiles): the mean of each phase's seconds and peak memory."""
    check_config(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    arch, depth = (TOY_ARCH, TOY_DEPTH) if args.tiny else (OFFICIAL_ARCH, args.depth)
    with torch.device(device):  # random weights, initialised where they run
        vae, var = build_vae(arch), build_var(arch, depth)
    reward_fn = build_reward(args, device, random_weights=True)  # the --clip-model architecture, untrained
    policy = Policy(var, args, clock=PhaseClock(device))
    use_the_device(args, device, policy)
    opt = torch.optim.AdamW(policy.trained, lr=args.lora_lr if policy.lora else args.lr, fused=device.type == "cuda")
    records = []
    for i in range(1 + repeats):
        label_B = torch.randint(var.num_classes, (args.classes_per_step,), generator=generator(args.seed, "classes", i))
        policy.clock.start()
        result = grpo_step(policy, vae, reward_fn, opt, label_B.repeat_interleave(args.group_size).to(device), args, i)
        policy.clock("update")
        records.append(step_record(result, args, policy.clock))
    first, records = records[0], records[1:]
    mean = lambda key: float(np.mean([r[key] for r in records]))
    n_images, peak = args.classes_per_step * args.group_size, matmul_tflops(device)
    phases = ("rollout", "reward", "update")
    result = dict(depth=var.depth, device=str(device), step_images=n_images,
                  first_step_s=sum(first[f"time_{phase}"] for phase in phases),
                  step_s=sum(mean(f"time_{phase}") for phase in phases),
                  **{f"step_{phase}_s": mean(f"time_{phase}") for phase in phases},
                  logprob_gap_max=max(r["logprob_gap_max"] for r in records),
                  **{k: max(r[k] for r in records) if device.type == "cuda" else None for k in first if k.startswith("peak_")})
    tflops = update_flops(var, args, n_images) / result["step_update_s"] / 1e12
    result.update(step_images_per_s=n_images / result["step_s"], update_tflops=tflops, matmul_peak_tflops=peak,
                  update_mfu=tflops / peak)
    print(f"GRPO step, {n_images} images: {result['step_s']:.3f} s (rollout {result['step_rollout_s']:.3f} + reward "
          f"{result['step_reward_s']:.3f} + update {result['step_update_s']:.3f}), {result['step_images_per_s']:.1f} "
          f"images/s, update {tflops:.3g} TFLOP/s = MFU {tflops / peak:.1%} of a measured {peak:.3g} TFLOP/s matmul"
          + (f", peak memory {result['peak_gpu_mem_gb']:.1f} GB" if device.type == "cuda" else "")
          + f"; first step {result['first_step_s']:.1f} s")
    return result


# ----------------------------------------------------------------------------------------------------------
# G. The tokenizer around its quantiser: the VQVAE module and its encoder and decoder, the standard VQGAN/LDM CNN
# (official basic_vae.py): channel multipliers (1,1,2,2,4), 16x downsampling, 2 res-blocks per level, GroupNorm(32).
# ----------------------------------------------------------------------------------------------------------

class VQVAE(nn.Module):
    """The tokenizer: encoder CNN, quantiser, decoder CNN (`cnn`: the toy world's smaller CNN)."""
    def __init__(self, vocab_size=4096, z_channels=32, ch=160, patch_nums=OFFICIAL_ARCH["patch_nums"],
                 quant_resi=0.5, share_quant_resi=4, **cnn):
        super().__init__()
        self.encoder, self.decoder = Encoder(ch, z_channels, **cnn), Decoder(ch, z_channels, **cnn)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, patch_nums, quant_resi, share_quant_resi)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1), nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.requires_grad_(False).eval()  # frozen: GRPO trains only the transformer

    def img_to_tokens(self, img_B3HW) -> List[torch.Tensor]:
        """Image in [-1, 1] -> K token maps (B, pn*pn), coarse to fine (official img_to_idxBl)."""
        return self.quantize.f_to_tokens(self.quant_conv(self.encoder(img_B3HW)))

    def fhat_to_img(self, f_hat_BCvhw):
        """Latent -> image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BCvhw)).clamp_(-1, 1)

    def tokens_to_img(self, tokens: List[torch.Tensor]):
        """K token maps -> image in [-1, 1] (official idxBl_to_img(..., same_shape=True, last_one=True))."""
        return self.fhat_to_img(self.quantize.tokens_to_fhat(tokens))


OFFICIAL_CH_MULT, OFFICIAL_RES_BLOCKS, OFFICIAL_NORM_GROUPS = (1, 1, 2, 2, 4), 2, 32


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, norm_groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, norm_groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out, norm_groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):  # x: (B, channels, h, w), as every feature map of this section
        y = self.conv1(F.silu(self.norm1(x), inplace=True))
        y = self.conv2(F.silu(self.norm2(y), inplace=True))
        return self.nin_shortcut(x) + y


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""
    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        ch = channels
        self.norm, self.qkv, self.proj_out = group_norm(ch, norm_groups), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, ch, h, w = x.shape
        query, key, value = self.qkv(self.norm(x)).reshape(B, 3, 1, ch, h * w).transpose(-1, -2).unbind(1)  # (B, 1, hw, ch)
        out = F.scaled_dot_product_attention(query, key, value)  # the official code: softmax(query key / sqrt(ch)) value
        return x + self.proj_out(out.transpose(-1, -2).reshape(B, ch, h, w))


class Resample(nn.Module):
    """2x down (zero-pad right/bottom, 3x3 stride-2 conv) or 2x up (nearest, 3x3 conv), as in VQGAN."""
    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution level of the encoder or decoder: res-blocks (with attention at the coarsest), then a resample."""
    def __init__(self, c_in: int, c_out: int, blocks: int, attn: bool, norm_groups: int, resample: str = ""):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, norm_groups) for i in range(blocks)])
        self.attn = nn.ModuleList([AttnBlock(c_out, norm_groups) for _ in range(blocks)] if attn else [])
        self.resample = resample
        if resample:
            setattr(self, resample, Resample(c_out, up=resample == "upsample"))

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample)(x) if self.resample else x


class Encoder(nn.Module):
    def __init__(self, ch: int, z_channels: int, ch_mult=OFFICIAL_CH_MULT, num_res_blocks=OFFICIAL_RES_BLOCKS,
                 norm_groups=OFFICIAL_NORM_GROUPS):
        super().__init__()
        widths, last = [ch * m for m in ch_mult], len(ch_mult) - 1  # level i's width; level 0 is the finest
        top = widths[-1]  # the coarsest level's width, and the middle's
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.Sequential(*[Level(widths[i - 1] if i else ch, widths[i], num_res_blocks, i == last, norm_groups,
                                          "" if i == last else "downsample") for i in range(len(ch_mult))])
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(top, top, norm_groups), AttnBlock(top, norm_groups)
        self.mid.block_2 = ResnetBlock(top, top, norm_groups)
        self.norm_out, self.conv_out = group_norm(top, norm_groups), nn.Conv2d(top, z_channels, 3, padding=1)

    def forward(self, img_B3HW):
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.down(self.conv_in(img_B3HW)))))
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class Decoder(nn.Module):
    def __init__(self, ch: int, z_channels: int, ch_mult=OFFICIAL_CH_MULT, num_res_blocks=OFFICIAL_RES_BLOCKS,
                 norm_groups=OFFICIAL_NORM_GROUPS):
        super().__init__()
        widths, last = [ch * m for m in ch_mult], len(ch_mult) - 1
        top = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(top, top, norm_groups), AttnBlock(top, norm_groups)
        self.mid.block_2 = ResnetBlock(top, top, norm_groups)
        # stored fine to coarse (the official order), run coarse to fine; each level reads the width of the one above
        self.up = nn.ModuleList([Level(widths[min(i + 1, last)], widths[i], num_res_blocks + 1, i == last, norm_groups,
                                       "upsample" if i else "") for i in range(len(ch_mult))])
        self.norm_out, self.conv_out = group_norm(widths[0], norm_groups), nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, f_BCvhw):
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(f_BCvhw))))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


# ----------------------------------------------------------------------------------------------------------
# H. More than one GPU: `torchrun --nproc_per_node N var_grpo.py ...` runs N copies, one per GPU (gloo on a CPU). Each
# rolls out P/N whole groups, and the rollouts are gathered on every process; each takes 1/N of every minibatch and
# the gradients are averaged as DDP averages them. Every draw is keyed by (seed, step, image), so the run is the same
# for any N up to the order of float sums. Only process 0 evaluates and writes. One process: Ranks(), doing nothing.
# ----------------------------------------------------------------------------------------------------------

DIST_TIMEOUT = timedelta(minutes=20)  # a process that hangs (rather than fails) ends the job after this long


class Ranks:
    """This process's place among torchrun's N processes, and the collectives the run needs (one process: none)."""
    def __init__(self, rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu")):
        self.rank, self.world, self.device = rank, world, device
        self.main = rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def share(self, n: int) -> slice:
        """This process's consecutive 1/N of n items; for the P*G images of a step, P/N whole groups."""
        part = n // self.world
        return slice(self.rank * part, (self.rank + 1) * part)

    def gather(self, x):
        """x (a tensor, a Rollout, or lists and dicts of them) of every process, concatenated along dim 0 in rank order."""
        if self.world == 1 or x is None:
            return x
        if isinstance(x, Rollout):
            return Rollout(**{f.name: self.gather(getattr(x, f.name)) for f in fields(x)})
        if isinstance(x, dict):
            return {k: self.gather(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self.gather(v) for v in x)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def gather_stats(self, stats: List[dict]) -> List[dict]:
        """The micro-batch statistics of every process (the step's record averages them)."""
        if self.world == 1:
            return stats
        every = [None] * self.world
        dist.all_gather_object(every, stats)
        return [st for r in every for st in r]

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on one (a stop signal reaches all of them at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def average_gradients(self, params: List[torch.Tensor]):
        """Each gradient becomes the mean over the processes, as DDP computes it: divided by N, then summed."""
        for p in params if self.world > 1 else []:
            if p.grad is not None:
                dist.all_reduce(p.grad.mul_(1 / self.world))


def world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE); 1 without torchrun."""
    value = os.environ.get("WORLD_SIZE", "1")
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    by_hand = value.strip().isdigit() and int(value) > 1 and missing
    if not value.strip().isdigit() or int(value) < 1 or by_hand:
        raise ValueError(f"the environment sets WORLD_SIZE={value!r}" + (f" without {', '.join(missing)}" if by_hand else
                         "") + ", as torchrun would not: unset WORLD_SIZE, or start it with torchrun --nproc_per_node N")
    return int(value)


@contextmanager
def torchrun_processes(device: torch.device):
    """(ranks, device): under torchrun, this process joins the group on GPU LOCAL_RANK; only rank 0 prints."""
    if world_size() == 1:
        yield Ranks(), device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # once per process (a script may call train() more than once), left at exit
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
        atexit.register(dist.destroy_process_group)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), device)
    try:
        with open(os.devnull, "w") as quiet, nullcontext() if ranks.main else redirect_stdout(quiet):
            yield ranks, device
    except BaseException as e:  # a collective failed because another process ended (gloo: closed; NCCL: DistError)?
        if isinstance(e, getattr(dist, "DistError", ())) or "closed by peer" in str(e) or "Connection reset" in str(e):
            print(f"error (process {ranks.rank} of {ranks.world}): another process of this torchrun job failed or ended "
                  f"early (its error, if it printed one, is above); this one stops too", file=sys.stderr, flush=True)
            time.sleep(3)  # so that torchrun sees the process that failed end first, and names it
            raise SystemExit(1) from None
        raise


def which_process() -> str:
    """" (process r of N)" under torchrun, for messages; "" in one process."""
    value = os.environ.get("WORLD_SIZE", "1").strip()
    return f" (process {os.environ['RANK']} of {value})" if value.isdigit() and int(value) > 1 and "RANK" in os.environ else ""


if __name__ == "__main__":
    sys.exit(exit_status(main()))
