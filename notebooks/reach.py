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


def pass_at_k(hits: int, n: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021, HumanEval): the chance that k of the n samples, drawn without
    replacement, hold at least one hit, 1 - C(n - hits, k) / C(n, k), as a product (no huge binomials). k <= n."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, not {n}")
    return 1.0 if n - hits < k else 1 - math.prod((n - hits - i) / (n - i) for i in range(k))


def share_interval(hits: int, n: int, z: float = 1.96):
    """Wilson's 95% interval for a share measured as hits in n (it stays inside [0, 1] for a handful of hits)."""
    p, spread = hits / n, z * math.sqrt(hits / n * (1 - hits / n) / n + z * z / (4 * n * n))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    return max(0.0, centre - spread / (1 + z * z / n)), min(1.0, centre + spread / (1 + z * z / n))


def pass_interval(hits: int, n: int, k: int):
    """A 95% interval for pass@k: the share's interval through p -> 1 - (1 - p)^k, which rises with p."""
    return tuple(1 - (1 - p) ** k for p in share_interval(hits, n))


@torch.no_grad()
def summary_accuracy(var, vae, seed: int, n: int = 256, temperature: float = 1.0) -> float:
    """The judge's class accuracy on the n samples a --tiny run's summary.json draws at the start (the same classes,
    seeds, guidance and temperature as vg.measure_policies): for runs recorded before it was stored."""
    args = vg.parse_config(["--tiny", "--seed", str(seed)])
    labels = vg.spread_classes(vg.class_pools(args, var.num_classes)[0], n, seed)
    images = vg.sample(var, vae, labels, vg.image_seeds(n, seed, "summary"), args.cfg, temperature).image
    return (vg.load_judge(args, torch.device("cpu"))(images).argmax(-1) == labels).float().mean().item()


def grpo_run(colour: str, reward: str, seed: int, steps: int, temperature: float = 1.0, summary_samples: int = 256,
             record: Path = None):
    """One --tiny GRPO run towards `colour`: reward "prompt" (the toy CLIP, --prompt "a <colour> shape", clip=1) or
    "pixels" (reach:<colour>_pixels=1). Returns the colour's share among summary_samples fresh samples, start and end,
    and the class accuracy, start and end, all at the run's temperature (summary.json); for a run at T != 1 also
    start_T1 and end_T1, the shares at the policies' own distribution, T = 1. record: a JSON file of finished runs,
    read instead of running one again (the stored notebook's 27 runs take ~25 minutes on 2 CPU cores) and added to
    after each new run."""
    key = f"{colour} {reward} seed {seed} steps {steps} temperature {float(temperature)} samples {summary_samples}"
    try:
        done = json.loads(record.read_text()) if record is not None and record.is_file() else {}
    except ValueError as e:  # torn by a crash mid-write, or edited by hand
        raise SystemExit(f"error: {record} cannot be read ({vg.first_line(e)}); restore it with `git checkout -- "
                         f"{record}`, or delete it to run every setting again") from None
    if key in done and (temperature == 1.0 or "end_T1" in done[key]):
        if "accuracy_start" not in done[key]:  # recorded before it was kept: measured as the summary measured it
            vae, var = vg.load_models(vg.parse_config(["--tiny"]), torch.device("cpu"))
            done[key]["accuracy_start"] = summary_accuracy(var, vae, seed, summary_samples, temperature)
            record.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
        return done[key]
    out = Path(tempfile.mkdtemp(prefix="reach_")) / "run"
    flags = ["--tiny", "--seed", str(seed), "--steps", str(steps), "--temperature", str(temperature),
             "--summary-samples", str(summary_samples), "--eval-every", "1000000", "--save-every", "1000000",
             "--prompt", f"a {colour} shape",
             "--reward", "clip=1" if reward == "prompt" else f"reach:{colour}_pixels=1", "--out", str(out)]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trained = vg.main(flags)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    summary = trained["summary"]
    result = dict(start=summary["colours_start"][colour], end=summary["colours_end"][colour],
                  accuracy_start=summary["class_accuracy_start"], accuracy_end=summary["class_accuracy_end"],
                  samples=summary["samples"])
    if temperature != 1.0:  # the summary sampled at the run's temperature; the policy's own distribution is T = 1
        vae, var = vg.load_models(vg.parse_config(["--tiny"]), torch.device("cpu"))
        result.update(start_T1=colour_shares(var, vae, summary_samples, seed, temperature=1.0)[colour][0],
                      end_T1=colour_shares(trained["var"].eval(), vae, summary_samples, seed, temperature=1.0)[colour][0])
    if record is not None:  # written whole, then renamed: a crash leaves the previous record
        record.with_suffix(".tmp").write_text(json.dumps({**done, key: result}, indent=1, sort_keys=True) + "\n")
        record.with_suffix(".tmp").replace(record)
    return result


def mean_se(values):
    """The mean over seeds and its standard error (0 for one seed)."""
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
