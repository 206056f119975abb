"""
common.py -- what the notebooks share: finding var_grpo.py, choosing the official weights or the toy world, the
image grid `show`. Each notebook's first cell is `from common import *` and one call of `setup_models` or `setup_reward`.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "var_grpo.py").exists())  # the repository
for path in (ROOT, ROOT / "notebooks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook widgets are not needed here

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import var_grpo as vg  # noqa: E402
import toy_world as tw  # noqa: E402  (the toy world: its drawn images, shape names, the judge's accuracy)
from toy_world import show  # noqa: E402  (the image grid all the notebooks share)

__all__ = ["ROOT", "plt", "np", "torch", "vg", "tw", "show", "setup_models", "setup_reward", "cache_name"]
plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})


def cache_name() -> str:
    """The weight cache, named as a reader would write it (not a machine's temporary path)."""
    return "$HF_HUB_CACHE" if os.environ.get("HF_HUB_CACHE") else "the Hugging Face cache"


def cached(repo: str, name: str) -> bool:
    """Whether the Hugging Face cache holds the file `name` of the Hub repository `repo` (no network)."""
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo, name), str)


def setup_models(depth: int = 16, download: bool = False):
    """(args, device, vae, var, real): the official VQ-VAE and VAR-d{depth} when they are in the cache (download=True
    fetches them, 1.7 GB for d16), on the GPU if there is one; otherwise the toy world's models of --tiny on the CPU."""
    real = download or (cached(vg.VAR_REPO, vg.VAE_FILE) and cached(vg.VAR_REPO, f"var_d{depth}.pth"))
    device = torch.device("cuda" if real and torch.cuda.is_available() else "cpu")
    if real:
        args = vg.RunConfig(depth=depth, device=str(device))
        print(f"Official weights: VQ-VAE + VAR-d{depth} from {cache_name()}, on {device}.")
    else:
        args = vg.RunConfig(tiny=True, device="cpu")
        print(f"No official weights in {cache_name()}: using the TOY WORLD models of --tiny on the CPU (VAR-d2\n"
              f"pretrained on 32 px coloured shapes, notebook 00). For the official models pass download=True to\n"
              f"setup_models() (or `hf download FoundationVision/var` them) and run again.")
    vae, var = vg.load_models(args, device)
    arch = vg.OFFICIAL_ARCH if real else vg.TOY_ARCH
    print(f"VQ-VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, vocabulary V = {arch['vocab_size']}; "
          f"VAR depth {var.depth}, width {var.C}, {sum(p.numel() for p in var.parameters()) / 1e6:.2f}M parameters")
    return args, device, vae, var, real


def setup_reward(download: bool = False):
    """(args, device, reward_fn, real): the OpenAI CLIP ViT-L/14 and the real LAION aesthetic head (shipped in
    testdata/aesthetic/) with the prompt "ukiyo-e painting", when CLIP is in the cache (download=True fetches it,
    1.7 GB); otherwise the toy world's CLIP and aesthetic head with the prompt "a lime shape", on the CPU."""
    real = download or cached(vg.CLIP_REPO, vg.CLIP_FILE)
    device = torch.device("cuda" if real and torch.cuda.is_available() else "cpu")
    if real:
        head = ROOT / "testdata" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
        args = vg.RunConfig(prompt="ukiyo-e painting", reward="clip=1,aesthetic=0.05", clip_ckpt="",
                            aesthetic_ckpt=str(head), device=str(device))
        print(f"Official OpenAI CLIP ViT-L/14 (from {cache_name()}) and the LAION aesthetic head on {device}.")
    else:
        args = vg.RunConfig(tiny=True, prompt="a lime shape", reward="clip=1,aesthetic=0.05", device="cpu")
        print(f"No CLIP ViT-L/14 weights in {cache_name()}: falling back to the TOY CLIP and the toy aesthetic head of\n"
              f"--tiny (notebooks/toy/), on toy images. For the real ones pass download=True to setup_reward() (or\n"
              f"`hf download {vg.CLIP_REPO} {vg.CLIP_FILE}`) and run again.")
    reward_fn = vg.build_reward(args, device)  # CLIP with the prompt encoded once, the aesthetic head on its embeddings
    name = args.clip_model if real else vg.TOY_CLIP
    print(f"{name}: {sum(p.numel() for p in reward_fn.clip.parameters()) / 1e6:.1f}M parameters, "
          f"{reward_fn.text_emb_D.shape[0]}-d embeddings; prompt {args.prompt!r}")
    return args, device, reward_fn, real
