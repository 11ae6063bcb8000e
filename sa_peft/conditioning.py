"""Text conditioning of a fixed prompt set, encoded once so the text encoders can leave the device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InputError
from .models import is_flux, is_sd3, is_sdxl


@dataclass
class PromptConditioning:
    """Denoiser conditioning for a list of unique prompts; rows are picked per sample by prompt index.

    ``text_embeds`` are the pooled text embeddings, set for SDXL (with its ``add_time_ids`` in ``time_ids``) and for
    SD3 and FLUX (no ``time_ids``: the transformer takes them as ``pooled_projections``). SD3's
    ``encoder_hidden_states`` are its joint CLIP + T5 context, FLUX's its T5 states. FLUX also has ``text_ids`` (the
    text tokens' rotary position ids, all zero, as ``FluxPipeline.encode_prompt`` makes them) and, for a
    guidance-distilled transformer, ``guidance`` (the value of its guidance embedding).
    """

    prompts: list[str]
    encoder_hidden_states: torch.Tensor  # [P, L, D]
    text_embeds: torch.Tensor | None = None  # [P, D_pooled]
    time_ids: torch.Tensor | None = None  # [P, 6]
    text_ids: torch.Tensor | None = None  # [L, 3] (FLUX)
    guidance: float | None = None  # FLUX with guidance_embeds

    def index_of(self, prompt: str) -> int:
        try:
            return self.prompts.index(prompt)
        except ValueError:
            raise KeyError(f"prompt {prompt!r} was not encoded") from None

    def unet_kwargs(self, prompt_ids: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments for ``unet(noisy, t, **kwargs)`` for a batch of prompt indices."""
        ids = prompt_ids.to(self.encoder_hidden_states.device)
        hidden = self.encoder_hidden_states[ids]
        kwargs: dict = {"encoder_hidden_states": hidden if dtype is None else hidden.to(dtype)}
        if self.text_ids is not None:  # FLUX: txt_ids also marks the call as FLUX's (diffusion_loss.model_prediction)
            kwargs["txt_ids"] = self.text_ids if dtype is None else self.text_ids.to(dtype)
            if self.guidance is not None:  # as FluxPipeline: float32, one value per sample
                kwargs["guidance"] = torch.full((len(ids),), self.guidance, dtype=torch.float32, device=hidden.device)
        if self.text_embeds is not None and self.time_ids is None:  # SD3, FLUX
            pooled = self.text_embeds[ids]
            kwargs["pooled_projections"] = pooled if dtype is None else pooled.to(dtype)
        elif self.text_embeds is not None:
            text_embeds, time_ids = self.text_embeds[ids], self.time_ids[ids]
            if dtype is not None:
                text_embeds, time_ids = text_embeds.to(dtype), time_ids.to(dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        return kwargs

    def to(self, device: torch.device | str) -> PromptConditioning:
        move = lambda t: None if t is None else t.to(device)
        return PromptConditioning(
            self.prompts, move(self.encoder_hidden_states), move(self.text_embeds), move(self.time_ids),
            move(self.text_ids), self.guidance,
        )


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], resolution: int | None = None,
                   guidance_scale: float | None = None) -> PromptConditioning:
    """Encode each unique prompt once with the pipeline's own ``encode_prompt`` (no classifier-free guidance).

    ``guidance_scale``: the guidance embedding of a guidance-distilled FLUX transformer (required there, ignored
    elsewhere); the training script passes the guidance its sets were sampled with."""
    return encode_prompts_with_grad(pipe, prompts, resolution, guidance_scale)


def encode_prompts_with_grad(pipe, prompts: Sequence[str], resolution: int | None = None,
                             guidance_scale: float | None = None) -> PromptConditioning:
    """``encode_prompts`` with autograd on: gradients reach the text encoders' weights (textual inversion)."""
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise ValueError("no prompts to encode")
    device = pipe.text_encoder.device if pipe.text_encoder is not None else pipe.unet.device
    if is_flux(pipe):  # pooled CLIP and the T5 states (512 tokens, FluxPipeline's default), as the pipeline samples
        hidden, pooled, text_ids = pipe.encode_prompt(prompt=unique, prompt_2=None, device=device, num_images_per_prompt=1)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            if guidance_scale is None:
                raise InputError("`guidance_scale` is required for a guidance-distilled FLUX transformer "
                                 "(guidance_embeds): the value of its guidance embedding")
            guidance = float(guidance_scale)
        return PromptConditioning(unique, hidden, pooled, text_ids=text_ids, guidance=guidance)
    if is_sd3(pipe):  # the joint CLIP + T5 context and the pooled CLIP embeddings, as the pipeline samples with
        hidden, _, pooled, _ = pipe.encode_prompt(prompt=unique, prompt_2=None, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False)
        return PromptConditioning(unique, hidden, pooled)
    if is_sdxl(pipe):
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt=unique, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        # add_time_ids = original size, crop top-left, target size, as SDXL was trained.
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype, device=hidden.device)
        return PromptConditioning(unique, hidden, pooled, time_ids.repeat(len(unique), 1))
    hidden, _ = pipe.encode_prompt(unique, device, 1, False)
    return PromptConditioning(unique, hidden)


def check_prompt_clash(pipe, forget: Sequence[str], replay: Sequence[str]) -> None:
    """Refuse a replay prompt the model cannot tell from a forget prompt.

    The comparison is on the token ids every text encoder sees (after lower-casing, whitespace
    clean-up and the 77-token truncation): "A Cat" and "a cat" are one conditioning, so training would
    push the same input both to the surrogate and to the base model's own output.
    """
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None),
                              getattr(pipe, "tokenizer_3", None)) if t is not None]
    if not tokenizers:
        return

    def ids(prompts):
        rows = [t(list(prompts), padding="max_length", max_length=t.model_max_length, truncation=True).input_ids
                for t in tokenizers]
        return [tuple(tuple(r[i]) for r in rows) for i in range(len(prompts))]

    seen = dict(zip(ids(forget), forget))
    for key, prompt in zip(ids(replay), replay):
        if key in seen:
            raise InputError(f"replay prompt {prompt!r} and forget prompt {seen[key]!r} give the model the same tokens "
                             "(case, spacing and text past the tokenizer's length limit are lost); remove it from "
                             "`replay_prompts_file` or reword one of them")
