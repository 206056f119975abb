"""
toy_figure1.py -- the paper's Figure 1 in miniature, measured on a CPU.

arXiv 2505.23331 shows VAR-d30 fine-tuned with GRPO against the aesthetic reward, against a CLIP prompt, and against
both. Here the same three settings run in the toy world (`python var_grpo.py --tiny ...`, the same code), plus a
control prompt that names a colour the VAR was pretrained on:

  aesthetic          --reward aesthetic=1                   the toy head's taste: large shapes near the centre
  clip               --reward clip=1                        "a lime shape": a colour the pretraining never showed
  clip + aesthetic   (the --tiny defaults)                  clip=1,aesthetic=0.05
  control: red       --prompt "a red shape" --reward clip=1 a colour one pretraining sample in eight has

Each setting is one run with the --tiny defaults otherwise. The table takes its figures from each run's
summary.json (256 fresh samples of the starting and the final policy, same classes and seeds): the reward's gain in
standard errors, the share of lime and of red shapes (measured from pixels), the judge's class accuracy, the
diversity, and the wall time of the whole run. The picture shows the same 10 classes and seeds drawn by the starting
policy and by each final one.

Run from the repository root:  python notebooks/toy_figure1.py  (about 4 minutes on 2 CPU cores; writes
notebooks/toy/figure1.png and figure1.json, and prints the README's table)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import var_grpo as vg  # noqa: E402

SETTINGS = {
    "aesthetic": ["--reward", "aesthetic=1"],
    "clip": ["--reward", "clip=1"],
    "clip + aesthetic": [],
    "control: red": ["--prompt", "a red shape", "--reward", "clip=1"],
}


def read(path: Path, how=lambda path: json.loads(path.read_text())):
    """A file of a finished run, or one line that names it if it cannot be read (torn, damaged)."""
    try:
        return how(path)
    except (OSError, ValueError, vg.WeightsError) as e:
        raise SystemExit(f"error: {path} cannot be read ({vg.first_line(e)}); remove {path.parent} to run that setting "
                         f"again") from None


def run(name: str, flags: list, root: Path, seed: int) -> dict:
    """One --tiny run; its summary, the wall time, and the final policy. A run that finished before (its summary.json
    and var_final.pth are there) with the same settings and seed (its config.json) is read, not repeated; one that a
    stop interrupted continues with --resume."""
    out = root / name.replace(" ", "").replace(":", "-").replace("+", "-")
    argv = ["--tiny", "--seed", str(seed), "--out", str(out), *flags]
    command = "python var_grpo.py " + " ".join(a if " " not in a else repr(a) for a in argv[:3] + flags)
    if (out / "summary.json").is_file() and (out / "var_final.pth").is_file() and (out / "seconds.json").is_file():
        config, want = read(out / "config.json"), vars(vg.parse_config(argv))
        differs = [f"--{k.replace('_', '-')} {config.get(k)!r} there, {v!r} here" for k, v in want.items()
                   if k not in ("out", "resume") and config.get(k) != v]
        if differs:
            raise SystemExit(f"error: {out} holds a finished {name!r} run of other settings ({'; '.join(differs)}); "
                             f"give another --runs, or remove it to run this setting")
        print(f"{name}: finished before in {out} (the same settings and seed); read from there")
        with torch.device("meta"):
            var = vg.build_var(vg.TOY_ARCH, vg.TOY_DEPTH)
        return dict(command=command, seconds=read(out / "seconds.json"), summary=read(out / "summary.json"),
                    var=read(out / "var_final.pth", lambda path: vg.load_weights(var, path)))
    resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
    before = read(out / "seconds.json") if resume and (out / "seconds.json").is_file() else 0.0
    t0 = time.time()
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
        result = vg.main(argv + resume)
    seconds = before + time.time() - t0
    (out / "seconds.json").write_text(json.dumps(seconds))
    if result["stopped"]:  # Ctrl-C (or a signal) stops the whole figure, not this run alone
        raise SystemExit(f"stopped by {result['stopped']} during the {name!r} run; run the same command again to "
                         f"continue (finished runs are reused, this one resumes)")
    return dict(command=command, seconds=seconds, summary=result["summary"], var=result["var"])


def figure(rows: dict, path: Path, seed: int):
    """One row per policy: the 10 classes drawn with the same seeds, enlarged, with the row's name on the left."""
    from PIL import Image, ImageDraw, ImageFont
    args = vg.parse_config(["--tiny"])
    vae = vg.load_models(args, torch.device("cpu"))[0]
    labels = torch.arange(10)
    scale, label_width, pad = 4, 190, 4
    side = 32 * scale
    canvas = Image.new("RGB", (label_width + 10 * (side + pad), len(rows) * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for r, (name, var) in enumerate(rows.items()):
        images = vg.sample(var.eval(), vae, labels, vg.image_seeds(len(labels), seed, "figure"),
                           args.cfg, args.temperature).image
        big = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        for c, img in enumerate(big):
            pixels = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            canvas.paste(Image.fromarray(pixels), (label_width + c * (side + pad), r * (side + pad)))
        draw.text((6, r * (side + pad) + side // 2 - 10), name, fill="black", font=font)
    canvas.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The paper's Figure 1 in miniature, in the toy world.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/figure1", help="where the four runs write their folders")
    parser.add_argument("--out", default=str(vg.TOY_DIR), help="where figure1.png and figure1.json go")
    args = parser.parse_args(argv)
    root, out = Path(args.runs), Path(args.out)
    try:  # every output is checked before minutes of training
        vg.check_writable(out, "--out")
        vg.check_writable(root, "--runs")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    results = {name: run(name, flags, root, args.seed) for name, flags in SETTINGS.items()}
    start = vg.load_models(vg.parse_config(["--tiny"]), torch.device("cpu"))[1]
    figure({"pretrained": start, **{name: r["var"] for name, r in results.items()}}, out / "figure1.png", seed=2024)

    record = {}
    print("| setting | command | reward gain | lime shapes | red shapes | class accuracy | diversity | time |")
    print("|---|---|---|---|---|---|---|---|")
    share = lambda summary, colour: f"{summary['colours_start'][colour]:.1%} -> {summary['colours_end'][colour]:.1%}"
    for name, r in results.items():
        summary = r["summary"]
        record[name] = dict(command=r["command"], seconds=round(r["seconds"], 1), **summary)
        print(f"| {name} | `{r['command']}` | {summary['reward_gain_in_se']:.1f} SE | {share(summary, 'lime')} | "
              f"{share(summary, 'red')} | {summary['class_accuracy_start']:.1%} -> {summary['class_accuracy_end']:.1%} | "
              f"{summary['diversity_start']:.2f} -> {summary['diversity_end']:.2f} | {r['seconds']:.0f} s |")
    record["_about"] = dict(command="python notebooks/toy_figure1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                            torch=torch.__version__, threads=torch.get_num_threads())
    (out / "figure1.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
