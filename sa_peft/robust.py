"""Robust forgetting (``--robust_forgetting``): adversarial training against the soft-prompt attack.

``sa-peft attack --attack soft_prompt`` finds, for the default forget adapter, a perturbation δ of the forget
prompt's embedding (‖δ_j‖ ≤ ‖e_j‖ per token) under which the adapted model draws the concept again
(benchmarks/RESULTS.md, "Attacks"). Robust forgetting runs that attack inside the training loop: every
``every`` steps δ is re-optimised (warm-started, a few Adam steps) against the current adapter on the frozen
model's held-out images of the concept, and half of each surrogate batch is paired with the perturbed
embedding instead of the plain one, so the surrogate is learned under the attack's embedding too.

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

DEFAULT_EVERY = 25
DEFAULT_ATTACK_STEPS = 20
DEFAULT_EPSILON = 1.0  # the attack's default bound, so training meets the attack it is measured against
DEFAULT_LR = 1e-2


def with_attack(signal: dict, attacked: dict) -> dict:
    """The forgetting signal of a robust run: a concept counts as forgotten only when it is forgotten both under
    the plain forget prompt (``signal``) and under the attack's embedding (``attacked``, the same probe measured
    with ``AdversarialSoftPrompt.attacked``); the largest preference is the larger of the two."""
    concepts = {p: {**c, "attacked_preference": attacked["concepts"][p]["preference"],
                    "forgotten": c["forgotten"] and attacked["concepts"][p]["forgotten"]}
                for p, c in signal["concepts"].items()}
    return {**signal, "concepts": concepts, "reached": all(c["forgotten"] for c in concepts.values()),
            "max_preference": max(signal["max_preference"], attacked["max_preference"])}


class AdversarialSoftPrompt:
    """One δ per forget prompt, refreshed against the adapter; ``augment`` pairs surrogates with it."""

    def __init__(self, forget_prompts: Sequence[str], concept_latents: Sequence[torch.Tensor], every: int = DEFAULT_EVERY,
                 attack_steps: int = DEFAULT_ATTACK_STEPS, epsilon: float = DEFAULT_EPSILON, lr: float = DEFAULT_LR,
                 batch_size: int = 16, seed: int = 0):
        self.forget_prompts = list(forget_prompts)
        self.concept_latents = list(concept_latents)
        self.every, self.attack_steps, self.epsilon, self.lr = every, attack_steps, epsilon, lr
        self.batch_size, self.seed = batch_size, seed
        self.deltas: list[torch.Tensor | None] = [None] * len(self.forget_prompts)
        self.last_losses: list[float] = []
        self.refreshed_at: int | None = None

    def maybe_refresh(self, step: int, unet, scheduler, conditioning: PromptConditioning, force: bool = False) -> bool:
        """Re-optimise every δ at steps 0, ``every``, 2·``every``, … (and whenever ``force``, as at each signal
        check); returns whether it did. A step is fitted once: the check at step s and step s's batch share it."""
        if step == self.refreshed_at or (not force and step % self.every and all(d is not None for d in self.deltas)):
            return False  # (a resumed run has no δ yet and refreshes at once)
        self.refreshed_at = step
        self.last_losses = []
        for i, (prompt, latents) in enumerate(zip(self.forget_prompts, self.concept_latents)):
            row = conditioning.index_of(prompt)
            pick = lambda t, r=row: None if t is None else t[r:r + 1]
            # The context detached: δ is what the attack fits. FLUX's text ids and guidance carry over.
            single = replace(conditioning, prompts=[prompt], encoder_hidden_states=pick(conditioning.encoder_hidden_states).detach(),
                             text_embeds=pick(conditioning.text_embeds), time_ids=pick(conditioning.time_ids))
            self.deltas[i], history = optimise_soft_prompt(unet, scheduler, single, latents, self.attack_steps, self.lr,
                                                           self.epsilon, self.batch_size, self.seed + step + i,
                                                           init=self.deltas[i])
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
        ids = surrogate_ids.clone()
        n = len(conditioning.prompts)
        for k, row in enumerate(rows):
            chosen = (surrogate_ids == row) & (torch.arange(len(ids), device=ids.device) % 2 == 1)
            ids[chosen] = n + k
        return augmented, ids
