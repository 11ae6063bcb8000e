"""The ``inversion`` attack (concept inversion, Pham et al. 2023): learn a new token's embedding with textual
inversion on the *base* model's images of the concept, then sample the adapted model with that token.

Every text encoder gets the token: SD 1.x/2.x one CLIP, SDXL two, SD3 two CLIPs and T5, FLUX a CLIP and T5, so
the learned concept reaches the denoiser through every text path it conditions on (the pooled CLIP embedding and
the context). Only the new rows of the input embedding tables move (gradients of every other row are masked, and Adam
without weight decay leaves a row with zero gradient exactly where it is), so the model is otherwise unchanged.
"""

from __future__ import annotations

import torch

from ..conditioning import encode_prompts_with_grad
from ..diffusion_loss import noise_scheduler_for, per_sample_diffusion_loss, sample_timesteps
from ..errors import InputError
from ..models import denoiser
from .context import AttackContext, best_samples, pooled_rate, summarise
from .sampling import sample

DEFAULT_TEMPLATE = "{token}"


def _text_pairs(pipe):
    suffixes = ("", "_2", "_3")  # SD3's T5 is the third; FLUX's the second
    pairs = ((getattr(pipe, f"tokenizer{s}", None), getattr(pipe, f"text_encoder{s}", None)) for s in suffixes)
    return [(t, e) for t, e in pairs if t is not None and e is not None]


def add_token(pipe, token: str) -> list[tuple[torch.nn.Embedding, int]]:
    """Add ``token`` to every tokenizer (SDXL has two, SD3 three, FLUX two) and a row for it to each text
    encoder's input embeddings, initialised to the mean embedding (no hint of the concept); returns
    ``(embedding, row)`` pairs."""
    rows = []
    for tokenizer, encoder in _text_pairs(pipe):
        if tokenizer.add_tokens([token]) != 1:
            raise InputError(f"token {token!r} is already in the tokenizer")
        row = tokenizer.convert_tokens_to_ids(token)
        # T5's table has more rows than its tokenizer has tokens (32128 for 32100): the new id is then an unused
        # row already; resizing to len(tokenizer) would cut the table instead. CLIP's table grows by one.
        if row >= encoder.get_input_embeddings().num_embeddings:
            encoder.resize_token_embeddings(row + 1, mean_resizing=False)  # the row is set below
        embedding = encoder.get_input_embeddings()
        with torch.no_grad():
            embedding.weight[row] = embedding.weight[:row].mean(dim=0)
        rows.append((embedding, row))
    return rows


def learn_token(ctx: AttackContext, latents: torch.Tensor, prompt: str, rows, steps: int, lr: float,
                batch_size: int, seed: int) -> list[float]:
    """Fit the token rows so the base model (adapter off) denoises ``latents`` well under ``prompt``; returns
    the loss every 10 steps."""
    pipe = ctx.pipe
    scheduler = noise_scheduler_for(pipe.scheduler)
    weights = [e.weight for e, _ in rows]
    masks = [torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device) for w in weights]
    for mask, (_, row) in zip(masks, rows):
        mask[row] = 1
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model = denoiser(pipe)
    device, dtype = model.device, model.dtype
    history = []
    ctx.disable_adapter()
    try:
        for step in range(steps):
            idx = torch.randint(len(latents), (batch_size,), generator=gen)
            t = sample_timesteps(scheduler, batch_size, gen, "cpu")  # the family's density (uniform for DDPM)
            noise = torch.randn(latents[idx].shape, generator=gen)
            cond = encode_prompts_with_grad(pipe, [prompt], ctx.resolution, ctx.guidance_scale)
            kwargs = cond.unet_kwargs(torch.zeros(batch_size, dtype=torch.long), dtype)
            loss = per_sample_diffusion_loss(model, scheduler, latents[idx].to(device, dtype), t.to(device),
                                             noise.to(device, dtype), kwargs).mean()
            grads = torch.autograd.grad(loss, weights)
            for w, g, mask in zip(weights, grads, masks):
                w.grad = g * mask
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0 or step == steps - 1:
                history.append(round(loss.item(), 5))
    finally:
        for w, parameter in zip(weights, flags):
            w.requires_grad_(parameter)
        ctx.enable_adapter()
    return history


def run_inversion_attack(ctx: AttackContext, steps: int = 300, lr: float = 5e-2, num_train_images: int = 64,
                         train_batch_size: int = 16, template: str = DEFAULT_TEMPLATE) -> dict:
    """One learned token per forget prompt; the adapted and the base model are sampled with ``template``
    (``{token}`` replaced by it) and scored."""
    if "{token}" not in template:
        raise InputError(f"`inversion_template` {template!r} must contain {{token}}")
    per_concept, grids = {}, None
    for i, forget_prompt in enumerate(ctx.forget_prompts):
        latents = ctx.concept_latents(forget_prompt, num_train_images)
        token = f"<sa-peft-inversion-{i}>"
        while token in ctx.pipe.tokenizer.get_vocab():
            token = token[:-1] + "x>"
        rows = add_token(ctx.pipe, token)
        prompt = template.replace("{token}", token)
        history = learn_token(ctx, latents, prompt, rows, steps, lr, train_batch_size, ctx.seed + 2 + i)
        ctx.log(f"inversion of {forget_prompt!r}: loss {history[0]:.4f} → {history[-1]:.4f} in {steps} steps")
        ctx.disable_adapter()
        base = sample(ctx, ctx.num_images, prompt=prompt)
        ctx.enable_adapter()
        adapted = sample(ctx, ctx.num_images, prompt=prompt)
        per_concept[forget_prompt] = {"prompt": prompt, "adapted": summarise(ctx, adapted),
                                      "base": summarise(ctx, base), "loss_history": history}
        if grids is None:
            grids = (best_samples(ctx, base), best_samples(ctx, adapted))
    return {
        "attack_success_rate": pooled_rate([m["adapted"] for m in per_concept.values()]),
        "base_rate": pooled_rate([m["base"] for m in per_concept.values()]),
        "steps": steps, "learning_rate": lr, "num_train_images": num_train_images, "template": template,
        "per_concept": per_concept,
        "_grid": grids,
    }
