"""Robust forgetting (``--robust_forgetting``): adversarial training against the soft-prompt attack.

``sa-peft attack --attack soft_prompt`` finds, for the default forget adapter, a perturbation δ of the forget
prompt's embedding (‖δ_j‖ ≤ ‖e_j‖ per token) under which the adapted model draws the concept again
(benchmarks/RESULTS.md, "Attacks"). Robust forgetting runs that attack inside the training loop: every
``every`` steps δ is fitted anew (from zero, ``attack_steps`` Adam steps) against the current adapter on the
frozen model's held-out images of the concept, and

- half of each surrogate batch is paired with the perturbed embedding instead of the plain one, so the surrogate
  is learned under the attack's embedding too;
- with a surrogate prompt, a concept-ablation term (Kumari et al. 2023) raises the concept's own loss there: on
  the frozen model's images of the concept (a set of their own, ``robust_concept_set``), noised, the adapted
  model's prediction under the forget prompt (half the batch) or under its perturbed embedding (the other half)
  is trained towards the frozen model's prediction under the surrogate prompt (``ablation_loss``).

Why both, and these settings (digits, soft prompt at ε = 1, benchmarks/RESULTS.md section 7): surrogate
pairing alone left the attack at 0.98 on zero and 0.72 on three; with the ablation term but the earlier attacker
(20 steps, warm-started) the in-loop attack was beaten on zero and the real one (200 steps) was not (1.00, Fréchet
distance +16.6 %); with the stronger in-loop attacker (100 steps, refitted from zero) the attack succeeds on 0.34–0.40
of zeros, 0.16–0.34 of threes (seeds 0 and 1) and 0.06 of sevens, at the cost of 1,000 steps and, on seven, a
Fréchet distance 11 % above the base model's. Those rates are the last step's: along one run (zero, seed 1,
checkpoints every 100 steps) the attack read 0.10 at step 500, 0.02 at 900 and 0.34 at 1,000, and the attacked
preference, from a δ of ``attack_steps`` = 100, does not order those checkpoints (the attack's own 200-step δ does).

The run ships the state the attack serves worst, not the last one (``LeastAttackedState``): every
``SELECTION_EVERY`` steps, a state that forgets under the plain prompt with retention inside its bound is attacked as
``sa-peft attack`` attacks (a δ of ``SELECTION_ATTACK_STEPS`` from zero, on 64 held-out images of the concept), its
``SELECTION_NUM_SAMPLES`` samples under δ judged by the frozen model; the one with the fewest read as the concept
ships, and the adapter's ``forgetting`` entry says which step that is and what each check read. The chosen reading is
the lowest of several, so the verdict attacks the shipped state once more, with a δ of its own seed and
``VERDICT_NUM_SAMPLES`` samples no check drew.

Every family the training script trains takes it: δ perturbs the context the denoiser attends to (the UNets'
cross-attention states, SD3's joint CLIP + T5 context, FLUX's T5 states), and every other field of the
conditioning (pooled embeddings, SDXL's time ids, FLUX's text ids and guidance) stays the prompt's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .attacks.soft_prompt import optimise_soft_prompt
from .conditioning import PromptConditioning
from .diffusion_loss import model_prediction, per_sample_diffusion_loss, sample_timesteps
from .forgetting import ATTACKED_SHARE_BOUND, sample_check_gate
from .objective import adapters_disabled

DEFAULT_EVERY = 25
DEFAULT_ATTACK_STEPS = 100  # 20 (warm-started) was beaten in the loop and not by the real attack: see the docstring;
# 200 (the attack's own budget) took three (seed 0) from 0.34 to 0.78 and zero (seed 1) from 0.34 to 0.20: not kept
DEFAULT_EPSILON = 1.0  # the attack's default bound, so training meets the attack it is measured against
DEFAULT_LR = 1e-2
DEFAULT_ABLATION_WEIGHT = 1.0  # 10 took zero to 0.04 but three to 0.94 and seven to 0.38 (RESULTS.md section 7)
ABLATION_IMAGES_PER_PROMPT = 64  # as many as the attack trains its δ on
# The shipped state's choice (``LeastAttackedState``): every 100 steps (zero, seed 1, checkpoints every 100 steps: the
# attack read 0.94 ... 0.10 (500) ... 0.02 (900), 0.34 (1,000)), a δ fitted as sa-peft attack fits its own (200
# steps from zero; 100 steps read 0.00-0.06 on every adapter, 200 ranked them as the attack does) and 16 samples.
SELECTION_EVERY = 100
SELECTION_ATTACK_STEPS = 200
SELECTION_NUM_SAMPLES = 16
# The verdict re-checks the chosen state with a δ of its own seed and this many samples no check drew: the choice's
# own reading is the lowest of about ten, so optimistic (zero, seed 0: 0 of 16 at the chosen step, the attack 0.14 of
# 50, and a verdict of "forgotten" with the choice's reading). At a true 0.14, 64 samples read ≤ 0.10 about a fifth
# of the time, 16 about half of it.
VERDICT_NUM_SAMPLES = 64


def with_attack(signal: dict, attacked: dict) -> dict:
    """The forgetting signal of a robust run: a concept counts as forgotten only when it is forgotten both under
    the plain forget prompt (``signal``) and under the attack's embedding (``attacked``, the same probe measured
    with ``AdversarialSoftPrompt.attacked``); the largest preference is the larger of the two."""
    concepts = {p: {**c, "attacked_preference": attacked["concepts"][p]["preference"],
                    "forgotten": c["forgotten"] and attacked["concepts"][p]["forgotten"]}
                for p, c in signal["concepts"].items()}
    return {**signal, "concepts": concepts, "reached": all(c["forgotten"] for c in concepts.values()),
            "max_preference": max(signal["max_preference"], attacked["max_preference"])}


def prompt_row(conditioning: PromptConditioning, prompt: str) -> PromptConditioning:
    """``prompt``'s row of ``conditioning``, its context detached (δ is what an attack fits); FLUX's text ids and
    guidance carry over."""
    row = conditioning.index_of(prompt)
    pick = lambda t: None if t is None else t[row:row + 1]
    return replace(conditioning, prompts=[prompt], encoder_hidden_states=pick(conditioning.encoder_hidden_states).detach(),
                   text_embeds=pick(conditioning.text_embeds), time_ids=pick(conditioning.time_ids))


def plainly_forgotten(concept: dict, threshold: float, gate: float) -> bool:
    """Whether a concept of a robust run's signal is forgotten under its plain forget prompt (``with_attack`` folds the
    attack into "forgotten"): its preference at most ``threshold`` or, once its samples were checked (a surrogate
    prompt), at most ``gate`` with the sample check passed."""
    check = concept.get("sample_check")
    if check is not None:
        return concept["preference"] <= gate and bool(check["forgotten"])
    return concept["preference"] <= threshold


class LeastAttackedState:
    """The adapter state a ``--robust_forgetting`` run ships: of the states checked (``offer``: every
    ``SELECTION_EVERY`` steps and the last one) that forget the concept under the plain prompt with retention inside
    its bound, the one whose samples under a freshly fitted soft-prompt attack read as the concept least often (the
    later one on a tie). The adversarial game does not settle: along one run the attack's success went 0.10 (step
    500), 0.52, 0.30, 0.02 (900), 0.34 (1,000, the state shipped before), benchmarks/RESULTS.md section 7.

    One more candidate is the mean of the states checked from ``average_from`` on (``swap_in_average``, checked last
    with ``offer_average``): on that run the mean of steps 500-1,000 let the attack succeed on none of 50 samples,
    fewer than any single state, with a Fréchet distance equal to the base model's (benchmarks/RESULTS.md section 7).

    ``params``: the trained tensors, in a fixed order (the saved copy is theirs, restored in place)."""

    def __init__(self, params: Sequence[torch.Tensor], every: int = SELECTION_EVERY, average_from: int | None = None):
        self.params, self.every, self.average_from = list(params), every, average_from
        self.attack_steps, self.num_samples = SELECTION_ATTACK_STEPS, SELECTION_NUM_SAMPLES  # the check's budget
        self.verdict_num_samples = VERDICT_NUM_SAMPLES
        self.shares: dict[int, float | None] = {}  # step → the attacked samples' share read as the concept (None: not eligible)
        self.best_step: int | None = None  # None with a chosen state: the mean ships (best_is_average)
        self.best_shares: dict[str, float] | None = None  # the chosen state's share per forget prompt
        self.best_tensors: list[torch.Tensor] | None = None
        self.last_step = 0
        self.sum: list[torch.Tensor] | None = None  # of the states averaged (float32)
        self.averaged_steps: list[int] = []
        self.average_share: float | None = None  # the mean's check (None: not a candidate, or not checked)
        self.verdict_shares: dict[str, float] | None = None  # the shipped state's re-check (per forget prompt)

    @property
    def best_share(self) -> float | None:
        """The chosen state's largest share (the one that decides), ``None`` without a candidate."""
        return None if self.best_shares is None else max(self.best_shares.values())

    @property
    def best_is_average(self) -> bool:
        """Whether the mean is the chosen state (chosen, with no step)."""
        return self.best_shares is not None and self.best_step is None

    def due(self, step: int, last: bool) -> bool:
        """Whether the state at ``step`` is to be checked: ``every`` steps after the last check, and the last step."""
        return last or step - self.last_step >= self.every

    def offer(self, step: int, shares: dict[str, float] | None) -> None:
        """Record the check at ``step`` (``shares``: per forget prompt, the attacked samples' share read as the
        concept; None: the state does not forget plainly or retain, not a candidate) and keep a copy of the weights
        when they are the best so far (the largest share decides). From ``average_from`` on, the state is added
        to the mean, candidate or not."""
        self.last_step = step
        share = None if shares is None else max(shares.values())
        self.shares[step] = share
        if share is not None and (self.best_share is None or share <= self.best_share):
            self.keep_best(step, shares)
        if self.average_from is not None and step >= self.average_from:
            with torch.no_grad():
                if self.sum is None:
                    self.sum = [p.detach().float().clone() for p in self.params]
                else:
                    for total, param in zip(self.sum, self.params, strict=True):
                        total.add_(param.detach().float())
            self.averaged_steps.append(step)

    def keep_best(self, step: int | None, shares: dict[str, float]) -> None:
        """The weights in place become the chosen state (``step`` None: the mean)."""
        self.best_step, self.best_shares = step, dict(shares)
        self.best_tensors = [p.detach().clone() for p in self.params]

    def swap_in_average(self) -> list[torch.Tensor] | None:
        """Put the mean of the averaged states in place (two or more) and return the weights it replaced, for
        ``put_back``; ``None``, weights untouched, with fewer."""
        if len(self.averaged_steps) < 2:
            return None
        replaced = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, total in zip(self.params, self.sum, strict=True):
                param.copy_((total / len(self.averaged_steps)).to(param.device, param.dtype))
        return replaced

    def offer_average(self, shares: dict[str, float] | None) -> None:
        """Record the check of the mean, in place (``swap_in_average``), as ``offer`` does a step's; it comes
        last, so it wins a tie."""
        self.average_share = None if shares is None else max(shares.values())
        if self.average_share is not None and (self.best_share is None or self.average_share <= self.best_share):
            self.keep_best(None, shares)

    def put_back(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (``swap_in_average``'s return, or the chosen state) into place."""
        with torch.no_grad():
            for param, saved in zip(self.params, tensors, strict=True):
                param.copy_(saved.to(param.device, param.dtype))

    def restore(self) -> bool:
        """Put the chosen weights back in place; whether there was a chosen state (weights untouched without)."""
        if self.best_tensors is None:
            return False
        self.put_back(self.best_tensors)
        return True

    def chosen(self) -> str:
        """The chosen state in words."""
        if self.best_is_average:
            return f"the mean of the states of steps {self.averaged_steps[0]}-{self.averaged_steps[-1]}"
        return f"the state of step {self.best_step}"

    def summary(self) -> dict:
        """What the adapter's metadata says about the choice (``forgetting["robust_selection"]``)."""
        return {"chosen_step": self.best_step, "chosen_average": self.best_is_average,
                "attacked_sample_share": self.best_share,
                "checks": {str(k): v for k, v in self.shares.items()}, "attack_steps": self.attack_steps,
                "num_samples": self.num_samples,
                "average": {"steps": list(self.averaged_steps), "attacked_sample_share": self.average_share},
                "verdict_check": None if self.verdict_shares is None else {
                    "attacked_sample_share": max(self.verdict_shares.values()), "num_samples": self.verdict_num_samples}}

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The JSON part and the tensors, for a checkpoint."""
        tensors = {} if self.best_tensors is None else {str(i): t.cpu().contiguous() for i, t in enumerate(self.best_tensors)}
        tensors.update({} if self.sum is None else {f"sum.{i}": t.cpu().contiguous() for i, t in enumerate(self.sum)})
        return {"shares": {str(k): v for k, v in self.shares.items()}, "best_step": self.best_step,
                "best_shares": self.best_shares, "last_step": self.last_step,
                "averaged_steps": self.averaged_steps}, tensors

    def load(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of ``state``."""
        self.shares = {int(k): v for k, v in state["shares"].items()}
        self.best_step, self.best_shares, self.last_step = state["best_step"], state["best_shares"], state["last_step"]
        self.averaged_steps = list(state.get("averaged_steps", []))
        n = len(self.params)
        self.best_tensors = [tensors[str(i)] for i in range(n)] if str(0) in tensors else None
        self.sum = [tensors[f"sum.{i}"].float() for i in range(n)] if "sum.0" in tensors else None


def with_attack_check(signal: dict, shares: dict[str, float] | None) -> dict:
    """The verdict of a robust run's shipped state: a concept is forgotten when it is forgotten under the plain prompt
    (``plainly_forgotten``) and at most ``ATTACKED_SHARE_BOUND`` of its samples under the attack check's δ read as the
    concept (``shares``, per forget prompt: ``LeastAttackedState.verdict_shares``, the shipped state's re-check;
    ``None`` when no state was a candidate, so none was checked under the attack). It replaces the attacked preference's say: that measure, from
    a 100-step δ, did not order the checkpoints the attack ranks (benchmarks/RESULTS.md section 7)."""
    gate = sample_check_gate(signal["threshold"])
    shares = shares or {}
    concepts = {}
    for prompt, c in signal["concepts"].items():
        share = shares.get(prompt)
        concepts[prompt] = {**c, **({} if share is None else {"attacked_sample_share": share}),
                            "forgotten": (plainly_forgotten(c, signal["threshold"], gate) and share is not None
                                          and share <= ATTACKED_SHARE_BOUND)}
    return {**signal, "concepts": concepts, "reached": all(c["forgotten"] for c in concepts.values())}


def fit_check_delta(unet, scheduler, conditioning: PromptConditioning, prompt: str, latents: torch.Tensor,
                    steps: int, seed: int) -> torch.Tensor:
    """The δ of ``LeastAttackedState``'s check for ``prompt``: fitted as ``sa-peft attack --attack soft_prompt`` fits
    its own (from zero, ``steps`` Adam steps, its learning rate, bound and batch) on ``latents``."""
    delta, _ = optimise_soft_prompt(unet, scheduler, prompt_row(conditioning, prompt), latents, steps, DEFAULT_LR,
                                    DEFAULT_EPSILON, 16, seed)
    return delta


class AdversarialSoftPrompt:
    """One δ per forget prompt, refreshed against the adapter; ``augment`` pairs surrogates with it, and
    ``ablation_loss`` (given ``ablation_latents``) trains the concept's images away under it.

    ``concept_latents``: per forget prompt, the held-out images δ is fitted on. ``ablation_latents``: the frozen
    model's images of the concepts, ``ablation_concepts`` the index of each one's forget prompt, and
    ``anchor_prompts`` each forget prompt's surrogate prompt (the prediction the concept is ablated towards)."""

    def __init__(self, forget_prompts: Sequence[str], concept_latents: Sequence[torch.Tensor], every: int = DEFAULT_EVERY,
                 attack_steps: int = DEFAULT_ATTACK_STEPS, epsilon: float = DEFAULT_EPSILON, lr: float = DEFAULT_LR,
                 batch_size: int = 16, seed: int = 0, ablation_latents: torch.Tensor | None = None,
                 ablation_concepts: torch.Tensor | None = None, anchor_prompts: Sequence[str] | None = None,
                 ablation_weight: float = DEFAULT_ABLATION_WEIGHT):
        self.forget_prompts = list(forget_prompts)
        self.concept_latents = list(concept_latents)
        self.every, self.attack_steps, self.epsilon, self.lr = every, attack_steps, epsilon, lr
        self.batch_size, self.seed = batch_size, seed
        if len({ablation_latents is None, ablation_concepts is None, anchor_prompts is None}) > 1:
            raise ValueError("ablation_latents, ablation_concepts and anchor_prompts go together")
        self.ablation_latents, self.ablation_concepts = ablation_latents, ablation_concepts
        self.anchor_prompts = None if anchor_prompts is None else list(anchor_prompts)
        self.ablation_weight = ablation_weight
        self.deltas: list[torch.Tensor | None] = [None] * len(self.forget_prompts)
        self.last_losses: list[float] = []
        self.refreshed_at: int | None = None

    def maybe_refresh(self, step: int, unet, scheduler, conditioning: PromptConditioning, force: bool = False) -> bool:
        """Fit every δ anew at steps 0, ``every``, 2·``every``, … (and whenever ``force``, as at each signal
        check); returns whether it did. A step is fitted once: the check at step s and step s's batch share it.
        From zero, not from the last δ: a warm-started attacker tracked one direction the adapter learned to close
        while the real attack, fitted from zero, found another (RESULTS.md section 7)."""
        if step == self.refreshed_at or (not force and step % self.every and all(d is not None for d in self.deltas)):
            return False  # (a resumed run has no δ yet and refreshes at once)
        self.refreshed_at = step
        self.last_losses = []
        for i, (prompt, latents) in enumerate(zip(self.forget_prompts, self.concept_latents)):
            self.deltas[i], history = optimise_soft_prompt(unet, scheduler, prompt_row(conditioning, prompt), latents,
                                                           self.attack_steps, self.lr, self.epsilon, self.batch_size,
                                                           self.seed + step + i)
            self.last_losses.append(history[-1])
        return True

    def attacked(self, conditioning: PromptConditioning) -> PromptConditioning:
        """``conditioning`` with each forget prompt's row replaced by its perturbed embedding (same prompt names),
        for measuring the forgetting signal under the attack."""
        if any(d is None for d in self.deltas):
            raise RuntimeError("AdversarialSoftPrompt.attacked before maybe_refresh at step 0")
        hidden = conditioning.encoder_hidden_states.clone()
        for prompt, d in zip(self.forget_prompts, self.deltas):
            row = conditioning.index_of(prompt)
            hidden[row:row + 1] = hidden[row:row + 1] + d.to(hidden.device, hidden.dtype)
        return replace(conditioning, prompts=list(conditioning.prompts), encoder_hidden_states=hidden)

    def augment(self, conditioning: PromptConditioning, surrogate_ids: torch.Tensor
                ) -> tuple[PromptConditioning, torch.Tensor]:
        """``conditioning`` with one perturbed row per forget prompt appended, and ``surrogate_ids`` with every
        other sample moved to its forget prompt's perturbed row (the other rows keep their indices)."""
        if any(d is None for d in self.deltas):
            raise RuntimeError("AdversarialSoftPrompt.augment before maybe_refresh at step 0")
        rows = [conditioning.index_of(p) for p in self.forget_prompts]
        hidden = conditioning.encoder_hidden_states
        perturbed = torch.cat([hidden[r:r + 1] + d.to(hidden.device, hidden.dtype) for r, d in zip(rows, self.deltas)])
        extra = lambda t: None if t is None else torch.cat([t, t[rows]])
        # FLUX's text_ids and guidance are one per call, not per prompt: they carry over as they are.
        augmented = replace(conditioning, prompts=[*conditioning.prompts, *(f"<adversarial>{p}" for p in self.forget_prompts)],
                            encoder_hidden_states=torch.cat([hidden, perturbed]),
                            text_embeds=extra(conditioning.text_embeds), time_ids=extra(conditioning.time_ids))
        return augmented, self.adversarial_ids(conditioning, surrogate_ids)

    def adversarial_ids(self, conditioning: PromptConditioning, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (rows of ``conditioning``) with every other sample of a forget prompt moved to that prompt's
        perturbed row of ``augment``'s conditioning (the rows after ``conditioning``'s own)."""
        moved = ids.clone()
        n, odd = len(conditioning.prompts), torch.arange(len(ids), device=ids.device) % 2 == 1
        for k, prompt in enumerate(self.forget_prompts):
            moved[(ids == conditioning.index_of(prompt)) & odd] = n + k
        return moved

    def ablation_loss(self, unet, base_unet, scheduler, conditioning: PromptConditioning,
                      augmented: PromptConditioning, base_conditioning: PromptConditioning, batch_size: int,
                      generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor | None:
        """The weighted concept-ablation term (``None`` without ablation images): ``batch_size`` of the concept's
        images, noised; ``unet``'s prediction under the forget prompt or, for every other sample, its perturbed
        row in ``augmented`` (``augment``'s output for ``conditioning``) against ``base_unet``'s with its adapters
        off under the surrogate prompt of ``base_conditioning`` (the frozen text encoder's)."""
        if self.ablation_latents is None:
            return None
        device = self.ablation_latents.device
        idx = torch.randint(len(self.ablation_latents), (batch_size,), generator=generator)
        latents, concepts = self.ablation_latents[idx.to(device)].to(dtype), self.ablation_concepts.cpu()[idx]
        rows = torch.tensor([conditioning.index_of(self.forget_prompts[k]) for k in concepts.tolist()], device=device)
        anchors = torch.tensor([base_conditioning.index_of(self.anchor_prompts[k]) for k in concepts.tolist()],
                               device=device)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = sample_timesteps(scheduler, batch_size, generator, device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad(), adapters_disabled(base_unet):
            frozen = model_prediction(base_unet, noisy, timesteps, base_conditioning.unet_kwargs(anchors, dtype))
        losses = per_sample_diffusion_loss(unet, scheduler, latents, timesteps, noise,
                                           augmented.unet_kwargs(self.adversarial_ids(conditioning, rows), dtype),
                                           target=frozen.to(dtype))
        return self.ablation_weight * losses.mean()
