"""Has the concept been forgotten? A signal that needs no classifier, and the verdict built on it.

Selective Amnesia lowers the likelihood of the concept under the forget prompt c_f below that of the
surrogate. The diffusion loss ℓ(x, c) bounds −log p(x | c), so the signal compares, under c_f and with
the same timesteps and noise, the adapted model's loss on held-out images of the concept (the frozen
model's own samples of c_f) with its loss on held-out surrogate images:

    gap(θ)      = ℓ_θ(x_concept, c_f) − ℓ_θ(x_surrogate, c_f)
    preference  = 1 − (gap(θ) − gap(θ*)) / (reference − gap(θ*))

1 for the base model (which prefers its own samples: gap(θ*) < 0), 0 at the reference gap, negative past
it. With a surrogate prompt c_s the reference lies ``SWAP_FRACTION`` of the way from gap(θ*) to the frozen
model's gap under c_s (a complete swap of concept for surrogate); otherwise it is 0 (equally likely). The
concept counts as forgotten when preference ≤ ``threshold`` (default 0). The retained counterpart is the
drift of the adapted model's predictions on held-out replay images from the frozen model's own,

    retention   = E‖ε_θ(x_t, c_r) − ε_θ*(x_t, c_r)‖² / E‖ε_θ*(x_t, c_r) − ε‖²

(0 for the base model), bounded by ``retention_bound``.

Every loss here is evaluated on fixed (timestep, noise) pairs drawn once from a seed: K stratified
timesteps per image, the same for the concept and surrogate images of a concept, so the gap's noise is
paired and small, and the signal at step s is comparable with the one at step 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .conditioning import PromptConditioning
from .diffusion_loss import is_flow_matching, model_prediction, prediction_target
from .errors import InputError

DEFAULT_PREFERENCE_THRESHOLD = 0.0
# Calibrated on the digits (benchmarks/RESULTS.md): at γ = 1, runs whose retained Fréchet distance rose by 10-17 %
# drifted 6·10⁻⁴-1.8·10⁻³; runs within +4 % drifted 2-6·10⁻⁴; at the default γ = 30 every run drifted ~1·10⁻⁴.
DEFAULT_RETENTION_BOUND = 5e-4
SWAP_FRACTION = 0.8
# The reference without a surrogate prompt (noise, image folders). It is lenient: on the digits with a noise surrogate
# it said "forgotten" on all 30 noise runs of the two digits models, 16 of which the classifier judged not forgotten
# (10 of 20 on the UNet model at the noisiest-half default, 6 of 10 on the SD3 one; benchmarks/RESULTS.md, sections 0
# and 0b).
EQUAL_LOSSES = "equal losses"
LENIENT_NOTE = ("its reference is equal losses (no surrogate prompt: noise or an image folder), which on the digits "
                "said forgotten on all 30 noise runs while the classifier found the concept left in 16; check samples "
                "(--classifier)")
# The sample check (``ForgettingProbe.sample_margins``): each image is scored on this many fixed (timestep, noise)
# pairs, the same for every prompt. The digits prototype used 16 on 32 samples: the frozen model put every one of its
# own samples of each digit under the right prompt (320 of 320).
SAMPLE_CHECK_TIMESTEPS = 16
# The check costs (images) × SAMPLE_CHECK_TIMESTEPS × (judge prompts: the forget prompt, its surrogate prompt, the kept
# prompts) denoiser calls: 64 × 16 × 10 on the digits (19 s of a 2-core CPU shared with two other jobs). Past this many
# replay prompts it compares with an evenly spaced subset, so a long replay list does not multiply the cost.
SAMPLE_CHECK_MAX_PROMPTS = 16
# With a surrogate prompt the adapted model's own samples decide, checked at every signal check once the held-out
# preference has come half way (≤ this, or ≤ the threshold when that is higher): the preference alone ran late on some
# concepts, and the extra steps cost retained quality. Digits, nine → zero (seed 0): the samples were forgotten at step
# 150 (P(nine) 0.006, Fréchet distance −0.2 %) at preference +0.36, while the signal said forgotten only at step 475,
# when the retained Fréchet distance had risen +12.4 % (+3.1 % at 225, +7.9 % at 375). On 19 digit rows (two seeds) 16
# met every target with the samples deciding, 15 with the preference alone; two → three (seed 0) still ends at P(two)
# 0.031, and in the pair four + seven only 76 % of four's samples became fives (benchmarks/RESULTS.md, section 0; the
# surrogate reading below fixed it).
SAMPLE_CHECK_GATE = 0.5
# --robust_forgetting's verdict under attack (sa_peft.robust.with_attack_check): the shipped state's samples under a
# soft-prompt attack fitted afresh for the verdict read as the concept at most this often, the robust mode's target for
# the soft-prompt attack (success ≤ 10 %); of the verdict's 64 samples, six.
ATTACKED_SHARE_BOUND = 0.1
# How sure the verdict's re-check is of a share at or under the bound: the one-sided upper confidence bound at this
# level (``share_upper_bound``). Of 64 samples only 0-2 read as the concept bound the share under 0.10 at 90 %; the
# digits runs that counted as forgotten read 3-5 of 64, and two of them (4 and 5 of 64) let the attack through on 7 and
# 6 of 50 samples (benchmarks/RESULTS.md section 7), so such a verdict carries a WARNING.
VERDICT_CONFIDENCE = 0.9
# ... and the samples must be read as the surrogate about as often as the held-out surrogate images are: no longer the
# concept is not enough. Digits, four + seven → five + eight (seed 0): with the first condition alone the run stopped
# with P(four) 0.008 but only 0.76 of four's samples read as five (8 of 50 as eight, the other concept's surrogate). The
# slack lets one sample in ten (one of the 16 checked) read otherwise: the classifier target is ≥ 0.95. With it, 17 of 18
# digit rows (two seeds, both pairs) met every target, four + seven included; runs took 150-575 steps.
SURROGATE_READING_SLACK = 0.1


def read_share(margins: torch.Tensor) -> float:
    """The share of images the judge reads as the margins' prompt (a negative margin), rounded as it is logged."""
    return round(float((margins < 0).double().mean()), 6)


def surrogate_reading_bar(surrogate_as_surrogate: float) -> float:
    """The least share of a concept's samples that must read as its surrogate: the held-out surrogate images' own
    share, less ``SURROGATE_READING_SLACK``."""
    return surrogate_as_surrogate - SURROGATE_READING_SLACK


def sample_check_gate(threshold: float) -> float:
    """The preference at which a concept with a surrogate prompt has its samples checked: ``SAMPLE_CHECK_GATE``, or
    the threshold when that is higher."""
    return max(threshold, SAMPLE_CHECK_GATE)


@dataclass
class ProbeBatch:
    """Held-out latents, each paired with a prompt index, expanded over K fixed timesteps and noises."""

    latents: torch.Tensor  # [N·K, C, h, w]
    prompt_ids: torch.Tensor  # [N·K]
    timesteps: torch.Tensor  # [N·K]
    noise: torch.Tensor  # [N·K, C, h, w]
    num_images: int

    def images(self) -> torch.Tensor:
        """One copy of each held-out image ``[N, C, h, w]`` (the batch repeats each over its K timesteps)."""
        return self.latents[:: len(self.latents) // self.num_images]


def _probe_batch(latents: torch.Tensor, prompt_ids: torch.Tensor, num_timesteps: int, num_train_timesteps: int,
                 generator: torch.Generator, flow=None, min_timestep: int = 0) -> ProbeBatch:
    n, k = len(latents), num_timesteps
    if flow is not None:  # flow matching: the bins are equal-probability bins of the σ density
        timesteps = flow.stratified_timesteps(n, k, generator, min_timestep=min_timestep).flatten()
    else:
        edges = torch.linspace(min_timestep, num_train_timesteps, k + 1)
        # Stratified: timestep j of every image lies in bin j; the draw within the bin is per image.
        offsets = torch.rand(n, k, generator=generator)
        timesteps = (edges[:-1] + offsets * (edges[1:] - edges[:-1])).long().clamp(max=num_train_timesteps - 1).flatten()
    noise = torch.randn((n * k, *latents.shape[1:]), generator=generator)
    return ProbeBatch(latents.repeat_interleave(k, 0), prompt_ids.repeat_interleave(k), timesteps, noise, n)


class ForgettingProbe:
    """Held-out denoising losses of the concept, the surrogate and the replay set, on fixed noise.

    ``concept_latents[i]``/``surrogate_latents[i]`` are the held-out images of forget prompt
    ``forget_prompts[i]`` (same count per concept); ``replay_latents`` with ``replay_prompt_ids``
    (indices into ``conditioning.prompts``) the held-out replay images. ``forget_min_timestep``: the concept and
    surrogate images are measured at timesteps in [that, T) only, where the forget term trains (the replay images at
    every timestep). Call ``calibrate(unet)`` once
    on the frozen model (adapter disabled), then ``measure(unet)`` whenever a signal is wanted.
    """

    def __init__(
        self,
        conditioning: PromptConditioning,
        forget_prompts: Sequence[str],
        concept_latents: Sequence[torch.Tensor],
        surrogate_latents: Sequence[torch.Tensor],
        replay_latents: torch.Tensor,
        replay_prompt_ids: torch.Tensor,
        num_train_timesteps: int,
        num_timesteps: int = 8,
        seed: int = 0,
        threshold: float = DEFAULT_PREFERENCE_THRESHOLD,
        retention_bound: float = DEFAULT_RETENTION_BOUND,
        batch_size: int = 256,
        surrogate_prompts: Sequence[str | None] | None = None,
        noise_scheduler=None,
        forget_min_timestep: int = 0,
    ) -> None:
        if not (len(forget_prompts) == len(concept_latents) == len(surrogate_latents)) or not forget_prompts:
            raise InputError("one set of concept and surrogate probe images is needed per forget prompt")
        if num_timesteps <= 0:
            raise InputError(f"the probe's num_timesteps must be a positive integer, got {num_timesteps}")
        if not -10 <= threshold <= 10:  # finite and sane; ≥ 1 counts even the base model as forgotten
            raise InputError(f"`forgetting_threshold` must be in [-10, 10], got {threshold}")
        if not retention_bound > 0:
            raise InputError(f"`retention_bound` must be > 0, got {retention_bound}")
        if not 0 <= forget_min_timestep < num_train_timesteps:
            raise InputError(f"`forget_min_timestep` must be in [0, {num_train_timesteps}), got {forget_min_timestep}")
        self.conditioning = conditioning
        self.num_train_timesteps, self.seed = num_train_timesteps, seed
        self.forget_prompts = list(forget_prompts)
        self.threshold = threshold
        self.retention_bound = retention_bound
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(seed)
        # A flow-matching training scheduler (SD3) draws the fixed timesteps from its σ density.
        flow = noise_scheduler if noise_scheduler is not None and is_flow_matching(noise_scheduler) else None
        self.flow = flow
        self.concepts: list[tuple[ProbeBatch, ProbeBatch]] = []
        for prompt, concept, surrogate in zip(self.forget_prompts, concept_latents, surrogate_latents):
            n = min(len(concept), len(surrogate))
            if n == 0:
                raise InputError(f"no probe images for forget prompt {prompt!r}")
            ids = torch.full((n,), conditioning.prompts.index(prompt), dtype=torch.long)
            concept_batch = _probe_batch(concept[:n], ids, num_timesteps, num_train_timesteps, generator, flow=flow,
                                         min_timestep=forget_min_timestep)
            # The surrogate images of this concept see exactly the concept's timesteps and noise.
            surrogate_batch = ProbeBatch(surrogate[:n].repeat_interleave(num_timesteps, 0), concept_batch.prompt_ids,
                                         concept_batch.timesteps, concept_batch.noise, n)
            self.concepts.append((concept_batch, surrogate_batch))
        self.replay = _probe_batch(replay_latents, replay_prompt_ids, num_timesteps, num_train_timesteps, generator,
                                   flow=flow)
        # The same images under each concept's surrogate prompt (when the surrogate is a prompt): what a model
        # that fully swapped the concept for the surrogate would show under the forget prompt.
        self.surrogate_prompts = list(surrogate_prompts or [None] * len(self.concepts))
        self.under_surrogate: list[tuple[ProbeBatch, ProbeBatch] | None] = []
        for (c, s_batch), surrogate_prompt in zip(self.concepts, self.surrogate_prompts):
            if surrogate_prompt is None:
                self.under_surrogate.append(None)
                continue
            ids = torch.full_like(c.prompt_ids, conditioning.prompts.index(surrogate_prompt))
            self.under_surrogate.append((ProbeBatch(c.latents, ids, c.timesteps, c.noise, c.num_images),
                                         ProbeBatch(s_batch.latents, ids, c.timesteps, c.noise, c.num_images)))
        self.base: dict | None = None
        self.base_replay_predictions: torch.Tensor | None = None

    @torch.no_grad()
    def _predictions(self, unet, scheduler, batch: ProbeBatch, conditioning: PromptConditioning | None) -> torch.Tensor:
        """The UNet's predictions on ``batch`` (float32, on the CPU), in chunks of ``batch_size``."""
        conditioning = conditioning or self.conditioning
        param = next(unet.parameters())
        device, dtype = param.device, param.dtype
        out = []
        for start in range(0, len(batch.latents), self.batch_size):
            sl = slice(start, start + self.batch_size)
            latents, t = batch.latents[sl].to(device, dtype), batch.timesteps[sl].to(device)
            noisy = scheduler.add_noise(latents, batch.noise[sl].to(device, dtype), t)
            kwargs = conditioning.unet_kwargs(batch.prompt_ids[sl], dtype)
            out.append(model_prediction(unet, noisy, t, kwargs).float().cpu())
        return torch.cat(out)

    def _loss(self, unet, scheduler, batch: ProbeBatch, conditioning: PromptConditioning | None,
              predictions: torch.Tensor | None = None) -> float:
        """Mean denoising loss on ``batch`` (the usual ε / v target)."""
        if predictions is None:
            predictions = self._predictions(unet, scheduler, batch, conditioning)
        target = prediction_target(scheduler, batch.latents.float(), batch.noise.float(), batch.timesteps)
        return float((predictions.double() - target.double()).square().mean())

    def _raw(self, unet, scheduler, conditioning: PromptConditioning | None = None) -> tuple[dict, torch.Tensor]:
        """The probe losses (and the replay drift, once calibrated), with the replay predictions they came from."""
        was_training = unet.training
        unet.eval()
        try:
            concepts = [
                {"concept_loss": self._loss(unet, scheduler, c, conditioning),
                 "surrogate_loss": self._loss(unet, scheduler, s, conditioning)}
                for c, s in self.concepts
            ]
            replay_predictions = self._predictions(unet, scheduler, self.replay, conditioning)
        finally:
            unet.train(was_training)
        raw = {"concepts": concepts, "replay_loss": self._loss(unet, scheduler, self.replay, conditioning, replay_predictions)}
        if self.base_replay_predictions is not None:
            raw["replay_drift"] = float((replay_predictions.double() - self.base_replay_predictions.double()).square().mean())
        return raw, replay_predictions

    def calibrate(self, unet, scheduler, conditioning: PromptConditioning | None = None) -> dict:
        """Measure the frozen model (call with the adapter disabled); later signals are relative to it."""
        self.base_replay_predictions = None
        # The frozen model's own predictions on the held-out replay images: the retention signal is how far
        # the adapted model's predictions move from them.
        self.base, self.base_replay_predictions = self._raw(unet, scheduler, conditioning)
        self.base["replay_drift"] = 0.0
        was_training = unet.training
        unet.eval()
        try:
            for entry, pair in zip(self.base["concepts"], self.under_surrogate):
                if pair is not None:
                    entry["target_gap"] = (self._loss(unet, scheduler, pair[0], conditioning)
                                           - self._loss(unet, scheduler, pair[1], conditioning))
        finally:
            unet.train(was_training)
        return self.base

    @torch.no_grad()
    def sample_margins(self, unet, scheduler, latents: torch.Tensor, forget_prompt: str,
                       conditioning: PromptConditioning | None = None, screen: float | None = None) -> dict:
        """The frozen model as a zero-shot judge of images (call with the adapter disabled; a diffusion classifier,
        Li et al. 2023). Each image's denoising loss is averaged over ``SAMPLE_CHECK_TIMESTEPS`` fixed (timestep, noise)
        pairs under each judge prompt: ``forget_prompt``, its surrogate prompt (when it has one) and the replay prompts
        (at most ``SAMPLE_CHECK_MAX_PROMPTS`` of them, evenly spaced). A prompt's margin on an image is its loss minus
        the lowest loss under any other judge prompt: negative when the judge reads the image as that prompt.
        Returns {"concept": the forget prompt's margins, "surrogate": the surrogate prompt's (only with one)}. The
        pairs depend only on the seed and the image shape, so two calls are comparable.

        ``screen`` (a share; with a surrogate prompt only): when fewer than that share of the images denoise better
        under the surrogate prompt than under the forget prompt, no more of them can be read as the surrogate whatever
        the replay prompts' losses, so those are not computed (the replay prompts are most of the cost: 8 of 10 judge
        prompts on the digits). The margins are then against each other only, and the result has "screened": True."""
        conditioning = conditioning or self.conditioning
        n = len(latents)
        generator = torch.Generator().manual_seed(self.seed + 5_000_000)
        forget_id = conditioning.prompts.index(forget_prompt)
        surrogate = self.surrogate_prompts[self.forget_prompts.index(forget_prompt)]
        judges = [forget_id] + ([] if surrogate is None else [conditioning.prompts.index(surrogate)])
        batch = _probe_batch(latents.detach().float().cpu(), torch.full((n,), forget_id, dtype=torch.long),
                             SAMPLE_CHECK_TIMESTEPS, self.num_train_timesteps, generator, flow=self.flow)
        target = prediction_target(scheduler, batch.latents, batch.noise, batch.timesteps).double()
        kept = sorted(set(self.replay.prompt_ids.tolist()) - set(judges))
        if len(kept) > SAMPLE_CHECK_MAX_PROMPTS:
            kept = [kept[i * len(kept) // SAMPLE_CHECK_MAX_PROMPTS] for i in range(SAMPLE_CHECK_MAX_PROMPTS)]

        def losses_under(prompt_ids: list[int]) -> list[torch.Tensor]:
            out = []
            for prompt_id in prompt_ids:
                ids = torch.full_like(batch.prompt_ids, prompt_id)
                predictions = self._predictions(unet, scheduler, ProbeBatch(batch.latents, ids, batch.timesteps,
                                                                            batch.noise, n), conditioning)
                out.append((predictions.double() - target).square().flatten(1).mean(1).view(n, -1).mean(1))
            return out

        was_training = unet.training
        unet.eval()
        try:
            losses = losses_under(judges)
            screened = (screen is not None and surrogate is not None
                        and read_share(losses[1] - losses[0]) < screen)
            if not screened:
                losses += losses_under(kept)
        finally:
            unet.train(was_training)
        losses = torch.stack(losses, 1)

        def margin(column: int) -> torch.Tensor:
            others = torch.cat([losses[:, :column], losses[:, column + 1:]], 1)
            return losses[:, column] - others.min(1).values

        return {"concept": margin(0), **({} if surrogate is None else {"surrogate": margin(1)}),
                **({"screened": True} if screened else {})}

    def measure(self, unet, scheduler, conditioning: PromptConditioning | None = None) -> dict:
        """The signal now: per concept its preference and whether it is forgotten; retention; the verdict."""
        if self.base is None:
            raise RuntimeError("ForgettingProbe.measure before calibrate: measure the frozen model first")
        raw, _ = self._raw(unet, scheduler, conditioning)
        return forgetting_signal(self.base, raw, self.forget_prompts, self.threshold, self.retention_bound)


def forgetting_signal(base: dict, now: dict, forget_prompts: Sequence[str], threshold: float, retention_bound: float) -> dict:
    """Combine base and current probe losses into the signal and the verdict (pure arithmetic)."""
    concepts = {}
    for prompt, b, n in zip(forget_prompts, base["concepts"], now["concepts"]):
        base_gap = b["concept_loss"] - b["surrogate_loss"]
        gap = n["concept_loss"] - n["surrogate_loss"]
        # The gap at which the concept counts as no longer preferred. With a surrogate prompt, the target gap is
        # the frozen model's gap under the surrogate prompt (what a complete swap of concept for surrogate
        # shows), and the reference lies SWAP_FRACTION of the way from the base gap to it: this cancels how much
        # harder one kind of image is to denoise than the other ("two" → "three" plateaued at a raw gap of
        # 0.2 × the base gap with P(two) already 0.004). Without a surrogate prompt (noise, image folders): equal
        # losses. Calibration on the digits (benchmarks/RESULTS.md): 54 % of the way ↔ P(three) 0.42, 64 % ↔
        # P(five) 0.008, 82 % ↔ P(three) 0.001, 100 % ↔ P(two) 0.004; stopping at 60 % left P(one) at 0.21.
        target = b.get("target_gap")
        swap = target is not None and target > base_gap
        reference = base_gap + SWAP_FRACTION * (target - base_gap) if swap else 0.0
        # 1 for the base model, 0 at the reference gap, negative past it; 1 − (gap − b) / |b| without a target.
        preference = 1 - (gap - base_gap) / max(abs(reference - base_gap), 1e-12)
        concepts[prompt] = {
            "preference": preference, "forgotten": preference <= threshold,
            "concept_loss": n["concept_loss"], "surrogate_loss": n["surrogate_loss"], "base_gap": base_gap, "gap": gap,
            "reference_gap": reference, "reference": "swap" if swap else EQUAL_LOSSES,
        }
    # Retention: how far the adapted model's predictions on the held-out replay images moved from the frozen
    # model's, relative to the frozen model's own denoising error there. The replay loss itself cannot see the
    # damage: it moved by at most ±0.3 % on runs whose retained Fréchet distance rose 15 %, while this drift
    # ranked those runs (benchmarks/RESULTS.md).
    base_loss = base["replay_loss"]
    retention = now.get("replay_drift", 0.0) / base_loss if base_loss > 0 else 0.0
    reached = all(c["forgotten"] for c in concepts.values())
    return {
        "reached": reached,
        "retained": retention <= retention_bound,
        "concepts": concepts,
        "max_preference": max(c["preference"] for c in concepts.values()),
        "retention": retention,
        "replay_loss": now["replay_loss"],
        "base_replay_loss": base_loss,
        "replay_loss_change": now["replay_loss"] / base_loss - 1 if base_loss > 0 else 0.0,
        "threshold": threshold,
        "retention_bound": retention_bound,
    }


def with_sample_check(signal: dict, checks: dict[str, dict]) -> dict:
    """The signal with the sample check of the concepts in ``checks`` ({prompt: {"sample_margin", "concept_margin",
    "surrogate_margin", ...}}, the frozen model's mean margins on the adapted model's samples, on its own images of the
    concept and on the surrogate images): such a concept counts as forgotten only when the samples' margin has come
    ``SWAP_FRACTION`` of the way from the concept's margin to the surrogate's, as the signal's swap reference does.

    Why: without a surrogate prompt the signal's reference is equal losses, and on the digits' noise runs it said
    "forgotten" while guided samples still showed the concept, or bright squares the classifier read as it (16 of 30
    runs, benchmarks/RESULTS.md). Likelihoods on held-out images cannot see what guidance does to samples; the samples
    can. The whole way (the surrogate's margin itself) failed two of the first eight digit rows whose samples the
    classifier judged forgotten (P(two) 0.072, P(three) 0.021), and a perfect swap would pass it half the time.
    """
    concepts = {}
    for prompt, c in signal["concepts"].items():
        check = checks.get(prompt)
        if check is None:
            concepts[prompt] = c
            continue
        reference = check["concept_margin"] + SWAP_FRACTION * (check["surrogate_margin"] - check["concept_margin"])
        samples_forgotten = check["sample_margin"] >= reference
        concepts[prompt] = {**c, "sample_check": {**check, "reference_margin": round(reference, 6),
                                                  "forgotten": samples_forgotten},
                            "forgotten": c["forgotten"] and samples_forgotten}
    return {**signal, "concepts": concepts, "reached": all(c["forgotten"] for c in concepts.values())}


class AdaptiveLambda:
    """λ that moves with the forgetting signal: the run calibrates itself to its concept.

    A λ tuned on one concept is too strong for the next (digits: λ = 5 forgets "zero" and leaves "three"
    at P 0.58, benchmarks/RESULTS.md). At every signal check while some concept is not forgotten:
    - retention (the drift on held-out replay images) rose past ``retention_bound``: λ doubles (retention
      comes first);
    - the largest preference fell by less than ``min_progress`` since the last check, with retention
      under half its bound: λ ← ``decay``·λ, down to ``initial · min_factor`` (the penalty is what stalls it);
    - otherwise λ stays. Once every concept is forgotten λ no longer moves.
    """

    def __init__(self, initial: float, min_progress: float = 0.05, decay: float = 0.7, min_factor: float = 1 / 16) -> None:
        # Halving at every stalled check (min_progress 0.1, floor 1/64) took three → four from λ 5 to 0.08 in
        # 400 steps and cost Fréchet +10 % (benchmarks/RESULTS.md); a gentler decay keeps more of the penalty.
        self.initial = self.value = float(initial)
        self.min_progress = min_progress
        self.decay = decay
        self.floor = self.initial * min_factor
        self.previous: float | None = None

    def update(self, signal: dict) -> float:
        preference, retention, bound = signal["max_preference"], signal["retention"], signal["retention_bound"]
        if not signal["reached"]:
            if retention > bound:
                self.value = min(self.value * 2, self.initial * 4)
            elif self.previous is not None and self.previous - preference < self.min_progress and retention < bound / 2:
                self.value = max(self.value * self.decay, self.floor)
        self.previous = preference
        return self.value


def with_sample_shares(signal: dict, shares: dict[str, dict]) -> dict:
    """The signal with the in-training sample check of the concepts that have a surrogate prompt (reference "swap").
    ``shares`` holds, per concept checked, what the frozen model reads the adapted model's samples and the held-out
    surrogate images as (the judge prompt with the lowest loss, ``ForgettingProbe.sample_margins``): "sample_share" and
    "surrogate_share", the shares of samples and of surrogate images read as the concept; "sample_as_surrogate" and
    "surrogate_as_surrogate", the shares read as the surrogate; "num_samples". Such a concept counts as forgotten when
    its preference is at most ``SAMPLE_CHECK_GATE`` (or the threshold, when higher), its samples are read as the
    concept no more often than the surrogate images are, and as the surrogate at most ``SURROGATE_READING_SLACK`` less
    often than they are; a concept not checked is not forgotten. Under ``--robust_forgetting`` the attacked preference
    must still reach the threshold."""
    gate = sample_check_gate(signal["threshold"])
    concepts = {}
    for prompt, c in signal["concepts"].items():
        if c["reference"] != "swap":
            concepts[prompt] = c
            continue
        share = shares.get(prompt)
        passed = (share is not None and share["sample_share"] <= share["surrogate_share"]
                  and share["sample_as_surrogate"] >= surrogate_reading_bar(share["surrogate_as_surrogate"]))
        check = {} if share is None else {"sample_check": {**share, "forgotten": passed}}
        attacked = c.get("attacked_preference", signal["threshold"]) <= signal["threshold"]
        concepts[prompt] = {**c, **check, "forgotten": c["preference"] <= gate and passed and attacked}
    return {**signal, "concepts": concepts, "reached": all(c["forgotten"] for c in concepts.values())}


def verdict_lines(forgetting: dict) -> list[str]:
    """The verdict in words, for ``sa-peft inspect`` and the model card (one line each)."""
    concepts = forgetting.get("concepts", {})
    head = "FORGOTTEN" if forgetting.get("reached") else "NOT FORGOTTEN"
    step = forgetting.get("reached_at_step")
    lines = [f"{head} after {forgetting.get('trained_steps')} steps"
             + (f" (the signal first said forgotten at step {step})" if step is not None else "")
             + f"; retention {'inside' if forgetting.get('retained') else 'OUTSIDE'} its bound "
               f"(drift {forgetting.get('retention', 0):.2e} on held-out replay images, bound "
               f"{forgetting.get('retention_bound', 0):.2e})"]
    for prompt, c in concepts.items():
        attacked = (f", {c['attacked_preference']:+.3f} under the soft-prompt attack (`robust_forgetting`)"
                    if "attacked_preference" in c else "")
        if "attacked_sample_share" in c:
            attacked += (f"; under a soft-prompt attack fitted afresh for the verdict {c['attacked_sample_share']:.2f} of "
                         f"the samples read as the concept (at most {ATTACKED_SHARE_BOUND:.2f} to count forgotten)")
        check = c.get("sample_check")
        sampled = f"; {sample_check_text(check)}" if check else ""
        threshold = forgetting.get("threshold")
        rule = (f"the samples decide once it is ≤ {sample_check_gate(threshold)}" if check and "sample_share" in check
                else f"forgotten at ≤ {threshold}")
        lenient = f"; {LENIENT_NOTE}" if c.get("reference") == EQUAL_LOSSES and c["forgotten"] and not check else ""
        lines.append(f"{prompt!r}: preference {c['preference']:+.3f}{attacked} (base model 1, {rule}): "
                     f"{'forgotten' if c['forgotten'] else 'not forgotten'}{sampled}"
                     f"{lenient}")
    selection = forgetting.get("robust_selection")
    if selection is not None:
        lines.append(robust_selection_text(selection, forgetting.get("trained_steps")))
    return lines


def share_upper_bound(count: int, num_samples: int, confidence: float = VERDICT_CONFIDENCE) -> float:
    """The one-sided (Clopper-Pearson) upper confidence bound of a share read from ``count`` of ``num_samples``
    samples: the largest share under which ``count`` or fewer would still be drawn ``1 - confidence`` of the time."""
    if count >= num_samples:
        return 1.0
    at_most = lambda p: sum(math.comb(num_samples, i) * p ** i * (1 - p) ** (num_samples - i) for i in range(count + 1))
    low, high = count / num_samples, 1.0
    for _ in range(50):  # bisection: at_most falls as p grows
        middle = (low + high) / 2
        low, high = (middle, high) if at_most(middle) > 1 - confidence else (low, middle)
    return high


def recheck_bound(verdict_check: dict) -> tuple[int, float]:
    """(samples read as the concept, ``share_upper_bound``) of the verdict's re-check (``robust_selection["verdict_check"]``,
    its largest share over the forget prompts)."""
    count = round(verdict_check["attacked_sample_share"] * verdict_check["num_samples"])
    return count, share_upper_bound(count, verdict_check["num_samples"])


def robust_selection_text(selection: dict, trained_steps: int | None) -> str:
    """``--robust_forgetting``'s choice of the shipped state (``sa_peft.robust.LeastAttackedState``) in words."""
    ordered = sorted(selection["checks"].items(), key=lambda item: int(item[0]))  # JSON keys are strings
    share = lambda value: "-" if value is None else f"{value:.2f}"
    checks = ", ".join(f"{step}: {share(value)}" for step, value in ordered)
    average = selection.get("average") or {"steps": []}
    mean = (f"the mean of the states of steps {average['steps'][0]}-{average['steps'][-1]}"
            if len(average["steps"]) > 1 else None)
    if mean is not None:
        checks += f", {mean}: {share(average['attacked_sample_share'])}"
    rule = (f"states checked (step: share of {selection['num_samples']} samples under a soft-prompt attack fitted in "
            f"{selection['attack_steps']} steps that the frozen model reads as the concept; '-': not forgotten under the "
            f"plain prompt or retention outside its bound) {checks}")
    if selection["chosen_step"] is None and not selection.get("chosen_average"):
        return f"robust forgetting: no state checked was a candidate, so the last ships; {rule}"
    verdict = selection.get("verdict_check")
    recheck = ""
    if verdict is not None:
        count, bound = recheck_bound(verdict)
        recheck = (f"; re-checked for the verdict with a fresh attack and {verdict['num_samples']} fresh samples: "
                   f"{verdict['attacked_sample_share']:.2f}, {count} of {verdict['num_samples']}, at most {bound:.2f} "
                   f"at {VERDICT_CONFIDENCE * 100:.0f} % confidence")
    shipped = (f"{mean} of {trained_steps}" if selection.get("chosen_average")
               else f"the state of step {selection['chosen_step']} of {trained_steps}")
    return (f"robust forgetting: ships {shipped} (attacked samples read as the concept: "
            f"{selection['attacked_sample_share']:.2f}, the fewest{recheck}); {rule}")


def sample_check_text(check: dict) -> str:
    """One sample check in words: the margin form (runs without a surrogate prompt) or the share form (with one)."""
    head = f"sample check {'passed' if check['forgotten'] else 'FAILED'}"
    if "sample_share" in check:
        return (f"{head}: the frozen model reads {check['sample_share']:.2f} of {check['num_samples']} samples as the "
                f"concept (at most {check['surrogate_share']:.2f}, its reading of the surrogate images, to pass) and "
                f"{check['sample_as_surrogate']:.2f} as the surrogate (at least "
                f"{surrogate_reading_bar(check['surrogate_as_surrogate']):.2f} to pass)"
                + ("; screened: the replay prompts were not scored, as fewer samples denoise better under the surrogate "
                   "prompt than under the forget prompt" if check.get("screened") else ""))
    return (f"{head}: the frozen model's margin {check['sample_margin']:+.4f} on {check['num_samples']} samples (at "
            f"least {check['reference_margin']:+.4f} to pass; {check['concept_margin']:+.4f} on its own images of the "
            f"concept, {check['surrogate_margin']:+.4f} on the surrogate images)")


def forgetting_warning(forgetting: dict) -> str | None:
    """The WARNING a run ends with, saying what to try (``None`` when there is nothing to warn of)."""
    concepts = forgetting["concepts"]
    sampled = [p for p, c in concepts.items() if not c.get("sample_check", {"forgotten": True})["forgotten"]]
    if sampled:
        return (f"WARNING: the concept was NOT forgotten: the adapted model's samples of {sampled} look to the frozen "
                "model more like the concept than the surrogate images do (the sample check), although the signal on "
                "held-out images may say forgotten. Try another --forget_min_timestep, a larger step budget "
                "(--max_train_steps with --train_full_budget), or a surrogate prompt (--surrogate_prompt) in place "
                "of noise.")
    attacked = {p: c["attacked_sample_share"] for p, c in concepts.items()
                if c.get("attacked_sample_share", 0.0) > ATTACKED_SHARE_BOUND}
    if attacked and not forgetting["reached"]:
        return (f"WARNING: the concept was NOT forgotten under the soft-prompt attack: of the samples of the state "
                f"shipped (the least attacked one checked, --robust_forgetting), {attacked} read as the concept under "
                f"a soft-prompt attack fitted afresh to it (at most {ATTACKED_SHARE_BOUND:.2f} to count forgotten). Score it "
                "with `sa-peft attack` before you ship it; a larger --max_train_steps gives the run more states to "
                "choose from (digits, three: 2,000 steps shipped a state the attack succeeds on 0.10 of the time, "
                "1,000 steps one on 0.26).")
    if not forgetting["reached"]:
        attacked = any("attacked_preference" in c for c in concepts.values())
        return ("WARNING: the concept was NOT forgotten: the adapted model still prefers its own images of "
                f"{[p for p, c in concepts.items() if not c['forgotten']]} to the surrogate's"
                + (" (under the plain prompt or under the soft-prompt attack, --robust_forgetting)" if attacked else "")
                + ". Try a larger step budget (--max_train_steps), a higher --learning_rate, a lower --ewc_lambda, or "
                "a surrogate closer to the concept (--surrogate_prompt).")
    if not forgetting["retained"]:
        return (f"WARNING: forgotten, but the predictions on held-out replay images drifted by "
                f"{forgetting['retention']:.2e} (bound {forgetting['retention_bound']:.2e}): other concepts may have "
                "changed; try a higher --replay_weight or --ewc_lambda.")
    verdict = (forgetting.get("robust_selection") or {}).get("verdict_check")
    count, bound = (0, 0.0) if verdict is None else recheck_bound(verdict)
    if bound > ATTACKED_SHARE_BOUND:
        return (f"WARNING: forgotten under the soft-prompt attack by the verdict's re-check, but too close to call: "
                f"{count} of its {verdict['num_samples']} samples read as the concept, so the share may be up to "
                f"{bound:.2f} at {VERDICT_CONFIDENCE * 100:.0f} % confidence, over the {ATTACKED_SHARE_BOUND:.2f} that counts as "
                "forgotten (digits: re-checks of 4 and 5 of 64 said forgotten where the attack succeeded on 7 and 6 of "
                "50). Score it with `sa-peft attack --attack soft_prompt --num_images 200` before you ship it.")
    lenient = [p for p, c in concepts.items() if c.get("reference") == EQUAL_LOSSES and "sample_check" not in c]
    if lenient:
        return (f"WARNING: {lenient} forgotten by the signal, but {LENIENT_NOTE}; a surrogate prompt "
                "(--surrogate_prompt) gives the signal its calibrated reference.")
    return None
