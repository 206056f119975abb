"""
reach.py -- what the reach notebook (06_reach.ipynb) runs: pixel rewards for one toy colour each, usable as
`--reward reach:lime_pixels=1` (a reward of one's own, README), the pretrained policy's colour shares, and GRPO runs
towards a colour over several seeds.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

import var_grpo as vg


def colour_reward(name: str):
    """A pixel reward for the toy colour `name`: minus the RGB distance between the shape's colour (vg.shape_colour, as
    vg.toy_colour_of measures it) and the colour; -2 for an image without a shape."""
    target = torch.tensor(vg.TOY_COLOURS[name])

    def reward(images_B3HW):
        colour_B3 = vg.shape_colour(images_B3HW)
        return -(colour_B3 - target.to(images_B3HW.device)).norm(dim=1).nan_to_num(2.0).clamp(max=2.0)
    reward.__name__ = f"{name}_pixels"
    return reward


lime_pixels, brown_pixels, white_pixels = (colour_reward(c) for c in ("lime", "brown", "white"))


@torch.no_grad()
def colour_shares(var, vae, n: int, seed: int = 0, batch: int = 1000, cfg: float = 1.5, temperature: float = 1.0):
    """The share of each toy colour (and "none") among n samples of var, classes spread evenly: {colour: (share, se)}."""
    counts = torch.zeros(len(vg.TOY_COLOURS) + 1)
    for i in range(0, n, batch):
        labels = torch.arange(i, min(n, i + batch)) % var.num_classes
        images = vg.sample(var, vae, labels, vg.image_seeds(len(labels), seed, "reach", i), cfg, temperature).image
        counts += torch.bincount(vg.toy_colour_of(images), minlength=len(counts)).float()
    shares = counts / n
    return {name: (p, math.sqrt(p * (1 - p) / n)) for name, p in zip([*vg.TOY_COLOURS, "none"], shares.tolist())}


def grpo_run(colour: str, reward: str, seed: int, steps: int, temperature: float = 1.0, summary_samples: int = 256,
             record: Path = None):
    """One --tiny GRPO run towards `colour`: reward "prompt" (the toy CLIP, --prompt "a <colour> shape", clip=1) or
    "pixels" (reach:<colour>_pixels=1). Returns the colour's share among summary_samples fresh samples, start and end,
    and the final class accuracy. record: a JSON file of finished runs, read instead of running one again (the stored
    notebook's 27 runs take ~25 minutes on 2 CPU cores) and added to after each new run."""
    key = f"{colour} {reward} seed {seed} steps {steps} temperature {float(temperature)} samples {summary_samples}"
    done = json.loads(record.read_text()) if record is not None and record.is_file() else {}
    if key in done:
        return done[key]
    out = Path(tempfile.mkdtemp(prefix="reach_")) / "run"
    flags = ["--tiny", "--seed", str(seed), "--steps", str(steps), "--temperature", str(temperature),
             "--summary-samples", str(summary_samples), "--eval-every", "1000000", "--save-every", "1000000",
             "--prompt", f"a {colour} shape",
             "--reward", "clip=1" if reward == "prompt" else f"reach:{colour}_pixels=1", "--out", str(out)]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            summary = vg.main(flags)["summary"]
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    result = dict(start=summary["colours_start"][colour], end=summary["colours_end"][colour],
                  accuracy_end=summary["class_accuracy_end"], samples=summary["samples"])
    if record is not None:
        record.write_text(json.dumps({**done, key: result}, indent=1, sort_keys=True) + "\n")
    return result


def mean_se(values):
    """The mean over seeds and its standard error (0 for one seed)."""
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
