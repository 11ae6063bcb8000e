"""``--train_text_encoder``: LoRA on the CLIP text encoders, and the prompt set re-encoded through them each step.

The encoders that train are those diffusers' LoRA scripts train with the same flag: SD 1.x/2.x's CLIP, SDXL's and
SD3's two CLIPs, FLUX's CLIP (which gives FLUX only its pooled embedding). T5 (SD3's ``text_encoder_3``, FLUX's
``text_encoder_2``) stays frozen and off the device: its states are taken from the conditioning encoded once before
training, and only the CLIP parts are recomputed, exactly as each pipeline's ``encode_prompt`` computes them
(``tests/test_text_encoders.py`` compares the two with a LoRA on every encoder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from .conditioning import PromptConditioning
from .models import is_flux, is_sd3, is_sdxl

# The CLIP attention projections, as diffusers' scripts adapt them (``--train_text_encoder``).
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def trainable_text_encoders(pipe) -> tuple[str, ...]:
    """The pipeline attributes ``--train_text_encoder`` adapts: its CLIP encoders, never T5."""
    return ("text_encoder", "text_encoder_2") if is_sd3(pipe) or is_sdxl(pipe) else ("text_encoder",)


def _tokenizer_of(pipe, name: str):
    return getattr(pipe, name.replace("text_encoder", "tokenizer"))


class TrainedPromptEncoder:
    """The conditioning of a fixed prompt set through the trained CLIP encoders (autograd on).

    ``frozen`` is the set's conditioning from the frozen encoders (``encode_prompts``): every part the trained
    encoders do not produce comes from it unchanged (SD3's T5 states, SDXL's time ids, FLUX's T5 states, text ids
    and guidance). Call with ``{name: encoder}``, the (possibly accelerate-wrapped) modules of
    ``trainable_text_encoders``, so that gradients flow through the wrappers a multi-process run synchronises.
    """

    def __init__(self, pipe, frozen: PromptConditioning, device: torch.device | str | None = None) -> None:
        self.frozen = frozen
        self.names = trainable_text_encoders(pipe)
        self.family = "flux" if is_flux(pipe) else "sd3" if is_sd3(pipe) else "sdxl" if is_sdxl(pipe) else "sd"
        self.tokens, masks = {}, {}
        for name in self.names:
            tokenizer = _tokenizer_of(pipe, name)
            tokens = tokenizer(list(frozen.prompts), padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            self.tokens[name], masks[name] = tokens.input_ids, tokens.attention_mask
            if device is not None:
                self.tokens[name], masks[name] = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        # SD 1.x/2.x's encode_prompt passes the attention mask only to encoders configured to use one.
        use_mask = self.family == "sd" and getattr(pipe.text_encoder.config, "use_attention_mask", False)
        self.attention_mask = masks["text_encoder"] if use_mask else None

    def __call__(self, encoders: Mapping[str, torch.nn.Module]) -> PromptConditioning:
        frozen = self.frozen
        if self.family == "sd":
            hidden = encoders["text_encoder"](self.tokens["text_encoder"], attention_mask=self.attention_mask)[0]
            return replace(frozen, encoder_hidden_states=hidden)
        if self.family == "flux":  # FluxPipeline._get_clip_prompt_embeds: CLIP's pooled output only
            pooled = encoders["text_encoder"](self.tokens["text_encoder"], output_hidden_states=False).pooler_output
            return replace(frozen, text_embeds=pooled)
        states, pooled = [], []
        for name in self.names:  # the penultimate layer's states and output[0] (the projected pooled embedding)
            out = encoders[name](self.tokens[name], output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        if self.family == "sdxl":  # SDXL's pooled embedding is the second encoder's
            return replace(frozen, encoder_hidden_states=clip, text_embeds=pooled[1])
        # SD3: the two CLIPs' states zero-padded to T5's width, then T5's states (frozen) after them
        t5 = frozen.encoder_hidden_states[:, clip.shape[1]:].to(clip.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return replace(frozen, encoder_hidden_states=torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                       text_embeds=torch.cat(pooled, dim=-1))


def sampling_embeddings(conditioning: PromptConditioning, prompts: Sequence[str], negative: str | None,
                        ) -> dict[str, dict[str, torch.Tensor]]:
    """``validation.encode_for_sampling``'s format from a conditioning of ``prompts`` (and the ``negative`` prompt's
    row, for classifier-free guidance), for SD3 and FLUX, whose pipelines take ``prompt_embeds`` and
    ``pooled_prompt_embeds``."""
    row = lambda t, p: None if t is None else t[conditioning.index_of(p):conditioning.index_of(p) + 1].detach().cpu()
    out = {}
    for prompt in prompts:
        entry = {"prompt_embeds": row(conditioning.encoder_hidden_states, prompt),
                 "pooled_prompt_embeds": row(conditioning.text_embeds, prompt)}
        if negative is not None:
            entry["negative_prompt_embeds"] = row(conditioning.encoder_hidden_states, negative)
            entry["negative_pooled_prompt_embeds"] = row(conditioning.text_embeds, negative)
        out[prompt] = {k: v for k, v in entry.items() if v is not None}
    return out
