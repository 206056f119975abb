"""
lab.py -- the checks of the lab notebook (05_lab.ipynb), where a student writes the pieces of GRPO for VAR.

Each check runs the cases the project's own tests hold for that piece (test_var_grpo.py: the numbers worked out by
hand, and the sampler's own record of log-probabilities) against the student's function, and says in words which
property failed, with the numbers; where the wrong result matches a known mistake (the population std instead of
the sample std, the guidance without its ramp, ...) it names the mistake. A check prints one line, PASS or FAIL,
and returns True or False; it never raises, so that a notebook of blanks runs top to bottom. An answer that returns
None, or does not return within TIME_LIMIT_S, is named as such. test_var_grpo.py hands every check a list of wrong
answers of its own and requires FAIL for each (the lab's mutation test).

final_run trains the toy world's prompt run (`python var_grpo.py --tiny`) with the student's functions in place of
the project's, and prints the lime share and the class accuracy beside the reference run's.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch

import var_grpo as vg
import toy_world as tw


TIME_LIMIT_S = 20.0  # a student's function still running after this long is stopped (an endless loop?)


class Wrong(AssertionError):
    """What a check found wrong, in words."""


class TimedOut(BaseException):  # not an Exception, so that a student's `except Exception` cannot swallow it
    pass


def guarded(fn):
    """fn, stopped after TIME_LIMIT_S (where signals can be used: the main thread of a Unix process) and refused
    when it returns None."""
    def call(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
            out = fn(*args, **kwargs)
        else:
            def stop(signum, frame):
                raise TimedOut
            previous = signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
            try:
                out = fn(*args, **kwargs)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        if out is None:
            raise Wrong("it returned None: a missing return?")
        return out
    return call


def close(got, want, atol=1e-5) -> bool:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return got.shape == want.shape and bool(torch.allclose(got, want, atol=atol, rtol=0, equal_nan=False))


def numbers(x) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in torch.as_tensor(x, dtype=torch.float64).flatten().tolist()) + "]"


def report(name: str, check, *args) -> bool:
    """Run check(*args); print PASS, or FAIL with what was wrong in words; never raise."""
    try:
        check(*[guarded(a) if callable(a) else a for a in args])
    except TimedOut:
        print(f"FAIL {name}: it did not return within {TIME_LIMIT_S:g} s, so it was stopped (an endless loop?)")
        return False
    except NotImplementedError:
        print(f"FAIL {name}: not written yet (the function raises NotImplementedError)")
        return False
    except Wrong as e:
        print(f"FAIL {name}: {e}")
        return False
    except Exception as e:  # the student's code crashed: say where, briefly
        print(f"FAIL {name}: it raised {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        return False
    print(f"PASS {name}")
    return True


# ----------------------------------------------------------------------------------------------------------
# Exercise 1: group advantages (docstring step 6)
# ----------------------------------------------------------------------------------------------------------

def group_advantage_cases(group_advantages):
    for r, G, eps, want in [([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3, 0.0, [-1, 0, 1, 0, 0, 0]),
                            ([1.0, 2.0, 3.0, 5.0, 5.0, 11.0], 3, 0.0, [-1, 0, 1, -2 / 12 ** 0.5, -2 / 12 ** 0.5, 4 / 12 ** 0.5]),
                            ([1.0, 2.0, 3.0], 3, 1e-4, [-1 / 1.0001, 0, 1 / 1.0001]),
                            ([0.0, 0.0, 0.0, 4.0, 1.0, 1.0, 2.0, 0.0, 3.0, 3.0, 3.0, 3.0], 4, 0.0,
                             [-0.5, -0.5, -0.5, 1.5, 0, 0, 1.5 ** 0.5, -(1.5 ** 0.5), 0, 0, 0, 0])]:
        r = torch.tensor(r)
        got = torch.as_tensor(group_advantages(r, G, eps))
        if got.shape != r.shape:
            raise Wrong(f"on {len(r)} rewards in groups of G = {G} it returned shape {tuple(got.shape)}; want "
                        f"({len(r)},) = (B,): one advantage per image, in the rewards' order (flatten the (P, G) view)")
        if close(got, want):
            continue
        said = (f"rewards {numbers(r)} in groups of G = {G} (images 0..G-1, then G..2G-1), eps = {eps:g}: got "
                f"{numbers(got)}, want {numbers(want)}")
        if torch.isnan(got).any():
            raise Wrong(f"{said}. A group whose rewards are all equal has std 0, and its advantages must be 0 (nothing "
                        f"to learn), not NaN: divide only where std > 0")
        x = r.view(-1, G)
        population = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)
        if close(got, torch.nan_to_num(population.view(-1))):
            raise Wrong(f"{said}. That divides by the population std (1/G); GRPO uses the sample std, with Bessel's "
                        f"correction (1/(G-1), torch's default)")
        if any(close(got, (r - r.mean()) / (r.std(unbiased=u) + eps)) for u in (True, False)):
            raise Wrong(f"{said}. That is the whole batch's mean and std: each group of G consecutive images is compared "
                        f"within itself")
        if eps and close(got, (x - x.mean(1, keepdim=True)).view(-1) / x.std(1).repeat_interleave(G)):
            raise Wrong(f"{said}. The std needs + eps in the denominator: (R - mean) / (std + eps)")
        raise Wrong(f"{said}: (R - mean of its group) / (std of its group + eps)")


def check_group_advantages(group_advantages) -> bool:
    return report("group_advantages", group_advantage_cases, group_advantages)


# ----------------------------------------------------------------------------------------------------------
# Exercise 2: the clipped surrogate with the k3 KL per token, and the token weights (docstring step 7)
# ----------------------------------------------------------------------------------------------------------

def grpo_loss_cases(grpo_loss):
    for adv, ratio, want, clipped in [(+1.0, 1.5, -1.2, True), (+1.0, 0.5, -0.5, False), (-1.0, 1.5, +1.5, False),
                                      (-1.0, 0.5, +0.8, True)]:
        old = torch.full((1, 1), math.log(0.3))
        new = (old + math.log(ratio)).requires_grad_(True)
        loss = grpo_loss(new, old, torch.tensor([adv]), None, 0.2, 0.0)
        if torch.as_tensor(loss).dim() != 0:
            raise Wrong(f"it returned shape {tuple(torch.as_tensor(loss).shape)}; want a scalar J (0-dim tensor): the "
                        f"mean over each image's tokens, then over the images")
        if not close(loss.detach(), want, 1e-6):
            raise Wrong(f"one token, A = {adv:+g}, rho = {ratio}, eps_clip = 0.2: J = {loss.item():.4g}, want {want:+g} "
                        f"(-min(rho A, clip(rho, 0.8, 1.2) A): the pessimistic side counts, on both signs of A)")
        loss.backward()
        if (new.grad.abs().item() == 0) != clipped:
            raise Wrong(f"one token, A = {adv:+g}, rho = {ratio}: the gradient is {new.grad.item():.4g}; want "
                        + ("0 (the clipped side is the minimum, so the ratio gets no gradient)" if clipped else
                           "non-zero (the unclipped side is the minimum)"))
    logp = torch.log(torch.tensor([[0.5, 0.2], [0.1, 0.7]]))
    ref = torch.log(torch.tensor([[0.25, 0.2], [0.1, 0.7]]))
    k3 = 0.5 - math.log(0.5) - 1
    loss = grpo_loss(logp, logp.clone(), torch.zeros(2), ref, 0.2, 0.5)
    if not close(loss.detach(), 0.5 * (k3 / 2) / 2, 1e-6):
        hint = " That is k3 of q = log pi_theta - log pi_ref, the wrong way round." if close(
            loss.detach(), 0.5 * (2 - math.log(2.0) - 1) / 4, 1e-6) else ""
        raise Wrong(f"A = 0, rho = 1, beta = 0.5, pi_theta = 0.5 where pi_ref = 0.25 on one of 4 tokens (2 images x 2): "
                    f"J = {loss.item():.6g}, want beta * mean k3 = 0.5 * {k3:.6f} / 4 = {0.5 * k3 / 4:.6g} (k3 = e^q - q "
                    f"- 1, q = log pi_ref - log pi_theta, averaged over each image's tokens, then over images).{hint}")
    loss = grpo_loss(logp, logp.clone(), torch.tensor([2.0, -1.0]), None, 0.2, 0.0)
    if not close(loss.detach(), (-2.0 + 1.0) / 2, 1e-6):
        raise Wrong(f"rho = 1, A = [2, -1], beta = 0: J = {loss.item():.6g}, want the mean over images of -A = -0.5")
    logp = torch.zeros(1, 2, requires_grad=True)
    loss = grpo_loss(logp, logp.detach(), torch.zeros(1), torch.tensor([[math.log(2.0), 0.0]]), 0.2, 0.5)
    loss.backward()
    if logp.grad is None or not close(logp.grad, [[0.5 * (1 - 2) / 2, 0.0]], 1e-6):
        raise Wrong(f"the KL term's gradient with respect to log pi_theta is {None if logp.grad is None else numbers(logp.grad)}"
                    f"; want [-0.25, 0] (beta (1 - e^q) / L): the KL term must carry a gradient through log pi_theta "
                    f"(is it detached, or computed under no_grad?)")
    weight_L = torch.tensor([0.5, 0.25, 0.25])
    logp, ref = torch.zeros(1, 3), torch.tensor([[math.log(2.0), 0.0, 0.0]])
    loss = grpo_loss(logp, logp, torch.zeros(1), ref, 0.2, 1.0, weight_L)
    if not close(loss, (2 - math.log(2.0) - 1) * 0.5, 1e-6):
        raise Wrong(f"token weights w = [0.5, 0.25, 0.25], the KL on token 0 alone: J = {loss.item():.6g}, want "
                    f"w_0 * k3 = {(2 - math.log(2.0) - 1) * 0.5:.6g} (with weight_L given, J_i = sum_t w_t [...])")
    # B != L and advantages that differ between images, with and without token weights: the per-image A_i must
    # multiply every token of image i (adv_B[:, None]), and the weights both terms.
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.7, 0.2], [0.4, 0.4, 0.2]]))
    old = torch.log(torch.tensor([[0.4, 0.2, 0.25], [0.1, 0.5, 0.2], [0.5, 0.4, 0.1]]))  # rho: 1.25 1 1.2, 1 1.4 1, ...
    ref = torch.log(torch.tensor([[0.25, 0.2, 0.3], [0.2, 0.7, 0.1], [0.4, 0.5, 0.2]]))
    for B, adv_B, weights in [(3, [1.0, -0.5, 2.0], None), (2, [1.0, -0.5], None), (2, [1.0, -2.0], weight_L),
                              (3, [0.5, 1.0, -1.0], weight_L)]:
        args = (logp[:B], old[:B], torch.tensor(adv_B), ref[:B], 0.2, 0.5, weights)
        want = vg.grpo_loss(*args)[0]
        try:
            loss = grpo_loss(*args)
        except RuntimeError as e:
            raise Wrong(f"{B} images of 3 tokens: it raised RuntimeError ({str(e).splitlines()[0][:120]}): A_i, shape "
                        f"(B,), must be unsqueezed to (B, 1) to multiply the (B, L) ratios") from None
        if close(torch.as_tensor(loss).detach(), want, 1e-6):
            continue
        J = torch.as_tensor(loss).detach().double().sum().item()  # (summed, should a wrong answer not be a scalar)
        said = (f"{B} images of 3 tokens, A = {adv_B}, eps_clip = 0.2, beta = 0.5, token weights "
                f"{'none' if weights is None else numbers(weights)}: J = {J:.6g}, want {want.item():.6g}")
        rho = (args[0] - args[1]).exp()
        q = args[3] - args[0]
        kl = q.exp() - q - 1
        if B == 3 and weights is None:
            A_t = torch.tensor(adv_B)  # broadcast along the token axis
            if close(loss, (-torch.min(rho * A_t, rho.clamp(0.8, 1.2) * A_t) + 0.5 * kl).mean(), 1e-6):
                raise Wrong(f"{said}: that multiplies token t by A_t, the advantages broadcast along the tokens; "
                            f"image i's A_i multiplies all its tokens: adv_B.unsqueeze(1)")
        if weights is not None:
            A = torch.tensor(adv_B).unsqueeze(1)
            surrogate = -torch.min(rho * A, rho.clamp(0.8, 1.2) * A)
            if close(loss, (surrogate.mean(1) + 0.5 * (kl * weights).sum(1)).mean(), 1e-6):
                raise Wrong(f"{said}: the token weights were applied to the KL term alone; they weigh each token's "
                            f"whole [surrogate + beta KL]")
        raise Wrong(said)


def check_grpo_loss(grpo_loss) -> bool:
    return report("grpo_loss", grpo_loss_cases, grpo_loss)


# ----------------------------------------------------------------------------------------------------------
# Exercise 3: the teacher-forced log-probability of the drawn tokens, under the guidance ramp and the temperature
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)  # the checks only read them (a copy is trained in exercise 4)
def toy_models():
    return vg.load_models(vg.RunConfig(tiny=True), torch.device("cpu"))


@functools.lru_cache(maxsize=1)
def toy_draws():
    """Three toy pyramids of 4 images and their log-probs as the sampler recorded them, at (cfg, temperature)."""
    vae, var = toy_models()
    label_B = torch.tensor([0, 0, 5, 9])
    return label_B, {(cfg, temperature): vg.sample(var, vae, label_B, range(300, 304), cfg=cfg, temperature=temperature,
                                                   return_logprobs=True)
                     for cfg, temperature in [(2.5, 0.8), (0.0, 1.3), (1.5, 1.0)]}


def token_logprob_cases(token_logprobs):
    vae, var = toy_models()
    label_B, draws = toy_draws()
    for (cfg, temperature), drawn in draws.items():
        with torch.no_grad():
            got = token_logprobs(var, vae, label_B, drawn.tokens, cfg, temperature)
        if torch.as_tensor(got).shape != drawn.logp_BL.shape:
            raise Wrong(f"it returned shape {tuple(torch.as_tensor(got).shape)}; want (B, L) = {tuple(drawn.logp_BL.shape)}: "
                        f"one log-probability per drawn token")
        gap = (torch.as_tensor(got) - drawn.logp_BL).abs().max().item()
        if gap > 1e-4:
            mistake = known_logprob_mistake(var, vae, label_B, drawn.tokens, cfg, temperature, got)
            raise Wrong(f"at cfg = {cfg}, temperature = {temperature}, the log-probs differ from the ones the sampler "
                        f"recorded for the same tokens by up to {gap:.3g} (want < 1e-4, so that rho = 1 before any "
                        f"update)." + (f" They match {mistake}." if mistake else ""))
    # The values are right; GRPO also differentiates them: the gradient of sum_t c_t log pi(a_t) over the weights
    # must be the project's, through both branches of the guidance (cfg > 0), not only the class branch.
    drawn = draws[2.5, 0.8]
    c_BL = torch.randn(drawn.logp_BL.shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for fn in (vg.token_logprobs, token_logprobs):
        var.zero_grad(set_to_none=True)
        logp_BL = torch.as_tensor(fn(var, vae, label_B, drawn.tokens, 2.5, 0.8))
        if not logp_BL.requires_grad:
            raise Wrong("its log-probs carry no gradient (computed under torch.no_grad(), or detached?): GRPO's update "
                        "differentiates log pi_theta with respect to the transformer's weights")
        (logp_BL * c_BL).sum().backward()
        grads.append(torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in var.parameters()]))
    gap = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    if gap > 1e-4:
        raise Wrong(f"the values are right, but their gradient with respect to the weights is {gap:.3g} off the "
                    f"project's (relative; cosine {torch.nn.functional.cosine_similarity(grads[0], grads[1], 0):.3f}): "
                    f"part of the computation is detached; both guidance branches (the class and the null class) must "
                    f"carry the gradient")


def known_logprob_mistake(var, vae, label_B, tokens, cfg, temperature, got):
    """Which usual mistake `got` reproduces, in words, or None."""
    with torch.no_grad():
        f_BMCv = vae.quantize.tokens_to_var_input(tokens)
        logits_2BLV = var(torch.cat((label_B, torch.full_like(label_B, var.num_classes))), f_BMCv.repeat(2, 1, 1))
        cond, null = logits_2BLV.chunk(2)
        ramp = vg.guidance_per_token(var, cfg).float()
        tokens_BL = torch.cat(tokens, dim=1)
        mistakes = {
            "the distribution without guidance (s_k = 0)": cond / temperature,
            "guidance without its ramp (s_k = cfg at every scale)": ((1 + cfg) * cond - cfg * null) / temperature,
            "the distribution without the temperature": (1 + ramp) * cond - ramp * null,
            "the temperature multiplied instead of divided": ((1 + ramp) * cond - ramp * null) * temperature,
            "the two CFG branches swapped": ((1 + ramp) * null - ramp * cond) / temperature,
        }
    for words, z_BLV in mistakes.items():
        if close(z_BLV.log_softmax(-1).gather(-1, tokens_BL.unsqueeze(-1)).squeeze(-1), got, 1e-4):
            return words
    return None


def check_token_logprobs(token_logprobs) -> bool:
    return report("token_logprobs", token_logprob_cases, token_logprobs)


# ----------------------------------------------------------------------------------------------------------
# Exercise 4: one GRPO step (docstring steps 4-8), against the project's grpo_step on copies of one policy
# ----------------------------------------------------------------------------------------------------------

STEP_SETTING = dict(vg.TINY_DEFAULTS, tiny=True, classes_per_step=2, group_size=4, micro_batch=2, inner_epochs=2,
                    max_grad_norm=0.05)  # two minibatches of 4 images a pass, each in two micro-batches


def one_step(step_fn):
    """step_fn on a fresh copy of the toy VAR: what it returned, and the trained weights after it."""
    vae, var = toy_models()
    args = vg.RunConfig(**STEP_SETTING)
    policy = vg.Policy(copy.deepcopy(var), args)
    opt = torch.optim.AdamW(policy.trained, lr=args.lr, weight_decay=args.weight_decay)
    result = step_fn(policy, vae, vg.Reward({"area": 1.0}), opt, torch.tensor([3, 7]).repeat_interleave(4), args, 0)
    return result, torch.cat([p.detach().flatten() for p in policy.trained])


reference_step = functools.lru_cache(maxsize=1)(lambda: one_step(vg.grpo_step))


def grpo_step_cases(grpo_step):
    """What it checks is the step's own work: your advantages, the epochs, the shuffle, the minibatches, zeroing and
    clipping the gradient. Inside policy.accumulate_gradients the project's grpo_loss and token_logprobs run (yours
    are checked in exercises 2 and 3); final_run puts all four of yours together."""
    args = vg.RunConfig(**STEP_SETTING)
    (want, want_weights), (got, got_weights) = reference_step(), one_step(grpo_step)
    weights = [want_weights, got_weights]
    if not isinstance(got, dict) or not {"rollout", "adv_B", "stats", "grad_norms"} <= set(got):
        raise Wrong("it must return dict(rollout=..., adv_B=..., stats=..., grad_norms=...), what the log record is made of")
    if not close(got["adv_B"], want["adv_B"]):
        raise Wrong(f"its advantages {numbers(got['adv_B'])} are not the rollout's group advantages "
                    f"{numbers(want['adv_B'])}: step 6, within each group of G images")
    n_updates = args.inner_epochs * args.minibatches
    if len(got["grad_norms"]) != n_updates:
        raise Wrong(f"it made {len(got['grad_norms'])} updates; want --inner-epochs x --minibatches = {n_updates}, one "
                    f"optimizer step per minibatch")
    if not close(got["grad_norms"], want["grad_norms"], 1e-4):
        first_ok = close(got["grad_norms"][:1], want["grad_norms"][:1], 1e-4)
        raise Wrong(f"the gradient norms before clipping were {numbers(got['grad_norms'])}, want "
                    f"{numbers(want['grad_norms'])}" + (": the first minibatch agrees, the later ones not, so an update "
                    "went wrong. Check that you zero the gradients before each minibatch, clip them to --max-grad-norm "
                    "after accumulating and before opt.step(), and shuffle with generator(args.seed, 'shuffle', step, "
                    "epoch)" if first_ok else ": already the first minibatch differs: take the minibatches in the "
                    "order randperm(P*G, generator=generator(args.seed, 'shuffle', step, epoch)) gives"))
    if not close(weights[1], weights[0], 1e-6):
        raise Wrong(f"the weights after the step differ from the reference's by up to "
                    f"{(weights[1] - weights[0]).abs().max().item():.3g}, with the same gradient norms: clip the gradient "
                    f"to --max-grad-norm ({args.max_grad_norm}) after accumulating it and before opt.step()")


def check_grpo_step(grpo_step) -> bool:
    return report("grpo_step", grpo_step_cases, grpo_step)


# ----------------------------------------------------------------------------------------------------------
# Exercise 5: design a reward (README, "Your own reward"): small shapes
# ----------------------------------------------------------------------------------------------------------

def small_shape_cases(reward):
    labels = torch.arange(64) % len(tw.SHAPES)
    images, attrs = tw.draw(labels, torch.Generator().manual_seed(5))
    got = torch.as_tensor(reward(images), dtype=torch.float32)
    if got.shape != (64,):
        raise Wrong(f"on 64 images (64, 3, 32, 32) it returned shape {tuple(got.shape)}; want (64,), one number each")
    if not torch.isfinite(got).all():
        raise Wrong(f"{int((~torch.isfinite(got)).sum())} of its 64 values are not finite")
    blank = images[:2].clone()
    blank[:] = images[:2, :, :1, :1]  # the background colour everywhere: no shape at all (a sampler can draw that)
    on_blank = torch.as_tensor(reward(blank), dtype=torch.float32)
    if on_blank.shape != (2,) or not torch.isfinite(on_blank).all():
        raise Wrong(f"on 2 images with no shape (a plain background) it returned {numbers(on_blank)}: a reward must be "
                    f"finite on every image the policy can draw (1 / area is infinite where the area is 0)")
    if got.std() == 0:
        raise Wrong("it gives every image the same number: every advantage would be 0 and nothing would be learned")
    rank = lambda x: x.argsort().argsort().double()
    agreement = torch.corrcoef(torch.stack((rank(got), rank(-attrs["area"]))))[0, 1].item()
    if agreement < 0.8:
        raise Wrong(f"its ranking of 64 drawn shapes agrees with smallest-first only {agreement:.2f} (Spearman; want "
                    f">= 0.8): it should score a shape higher the less of the image it covers")


def check_small_shapes(reward) -> bool:
    return report("small_shapes", small_shape_cases, reward)


# ----------------------------------------------------------------------------------------------------------
# The last cell: the toy prompt run with the student's functions in place of the project's
# ----------------------------------------------------------------------------------------------------------

def final_run(group_advantages, grpo_loss, token_logprobs, grpo_step, checks_passed: bool, steps: int = 200) -> dict:
    """`python var_grpo.py --tiny` (the prompt "a lime shape", seed 0) with the four functions in place of the
    project's; prints the lime share and the class accuracy of 256 fresh samples beside the reference run's."""
    reference = json.loads((vg.TOY_DIR / "figure1.json").read_text())["clip + aesthetic"]
    said = (f"the reference run (`{reference['command']}`, figure1.json): lime shapes "
            f"{reference['colours_start']['lime']:.1%} -> {reference['colours_end']['lime']:.1%}, class accuracy "
            f"{reference['class_accuracy_start']:.1%} -> {reference['class_accuracy_end']:.1%}")
    if not checks_passed:
        print(f"skipped: every check above must pass first. For comparison, {said}")
        return {}
    real = dict(group_advantages=vg.group_advantages, grpo_loss=vg.grpo_loss, token_logprobs=vg.token_logprobs,
                grpo_step=vg.grpo_step)

    def loss_with_stats(*args, **kwargs):  # the student's J, the project's diagnostics (for the log)
        with torch.no_grad():
            stats = real["grpo_loss"](*args, **kwargs)[1]
        return grpo_loss(*args, **kwargs), stats

    def logprobs_with_entropy(var, vae, label_B, tokens, cfg, temperature, entropy=False):
        logp_BL = token_logprobs(var, vae, label_B, tokens, cfg, temperature)
        if not entropy:
            return logp_BL
        with torch.no_grad():  # the entropy is only logged
            return logp_BL, real["token_logprobs"](var, vae, label_B, tokens, cfg, temperature, entropy=True)[1]
    out = Path(tempfile.mkdtemp(prefix="lab_run_"))
    try:
        vg.group_advantages, vg.grpo_loss, vg.token_logprobs, vg.grpo_step = (  # (the run's --adv-norm is "group")
            lambda reward_B, group_size, eps, norm="group": group_advantages(reward_B, group_size, eps),
            loss_with_stats, logprobs_with_entropy, grpo_step)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = vg.train(vg.RunConfig(**{**vg.TINY_DEFAULTS, "tiny": True, "steps": steps, "out": str(out / "run")}))
    finally:
        vg.group_advantages, vg.grpo_loss, vg.token_logprobs, vg.grpo_step = real.values()
        shutil.rmtree(out, ignore_errors=True)
    summary = result["summary"]
    print(f"your run ({steps} steps): lime shapes {summary['colours_start']['lime']:.1%} -> "
          f"{summary['colours_end']['lime']:.1%}, class accuracy {summary['class_accuracy_start']:.1%} -> "
          f"{summary['class_accuracy_end']:.1%}, over {summary['samples']} fresh samples; {said}")
    return summary
