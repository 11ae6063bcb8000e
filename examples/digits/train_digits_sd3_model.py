"""Train the built-in ``builtin:digits-sd3``: an SD3-shaped flow-matching transformer on the same digits.

A ``StableDiffusion3Pipeline`` on scikit-learn's digits (16×16), the same data, prompts and classifier as
``builtin:digits`` (``train_digits_model.py``, whose functions this script imports):

- VAE: the trained ``builtin:digits`` VAE (1 channel, latent 4×8×8), unchanged weights; its config gets SD3's
  ``shift_factor`` (the training latents' mean) and a ``scaling_factor`` of 1/std around that mean, so latents
  (z − shift)·scale have mean 0 and std 1 as SD3's do.
- Text: two ``CLIPTextModelWithProjection`` encoders (32 wide, 32-dim projections) with the repository's tokenizer
  cut to 8 tokens (the longest prompt is 6: BOS, four words, EOS), and **no T5** (``text_encoder_3=None``, which
  SD3's pipeline supports by zero-padding the T5 part). A T5 would add parameters and nothing the ten prompts need.
- Denoiser: an ``SD3Transformer2DModel`` (joint attention blocks, 64 wide, patch 2 on the 8×8 latent: 16 image
  tokens), trained with the flow-matching loss (x_σ = (1−σ)·x₀ + σ·ε, target ε − x₀, σ from the logit-normal
  density of ``sa_peft.diffusion_loss.FlowMatchingNoise``, as the forgetting runs draw it), jointly with both text
  encoders, with 10 % empty-prompt dropout, EMA and the prompt-separation penalty of the UNet script.
- Scheduler: ``FlowMatchEulerDiscreteScheduler`` with shift 1 (SD3's shift 3 is for 4,096 image tokens; here are 16).

Run on one CPU thread:

    OMP_NUM_THREADS=1 python examples/digits/train_digits_sd3_model.py

Why training does not feed the transformer the pipeline's context as is: without T5 the pipeline's context is the
8 CLIP tokens plus ``max_sequence_length`` = 256 identical zero rows, 264 text tokens next to 16 image tokens, ten
times the work. Identical tokens stay identical through every block (per-token layers, the same attention), and
attention over n identical keys equals attention over one of them with log n added to its logit. Training therefore
runs on the 8 CLIP tokens plus one zero token whose key gets + log 256 (``CountedJointAttnProcessor``), which is the
same function (checked at start-up against the stock processor on the full context); the saved model has the stock
processor and is sampled by the stock pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits_model import (  # the UNet script, the module next to this one
    EMA,
    IMAGE_SIZE,
    PROMPTS,
    REPO_ROOT,
    cosine_lr,
    cpu_name,
    encode_stats,
    folder_size,
    load_digit_split,
    log,
    make_readable,
    measure_guidance,
    nearest_distances,
    replace_folder,
    separation_penalty,
    sweep_text,
)

# The CLIP context length: "a handwritten digit seven" is BOS + 4 words + EOS = 6 tokens; 8 leaves room.
TOKENS = 8
# StableDiffusion3Pipeline's default max_sequence_length: the number of zero T5 rows it appends without a T5.
T5_ZERO_TOKENS = 256
TEXT_WIDTH = 32
PROJECTION_DIM = 32


# ------------------------------------------------------------------------------------------ components


def load_digits_vae():
    """The ``builtin:digits`` VAE (weights unchanged); SD3's ``shift_factor`` is set from the latents later."""
    from diffusers import AutoencoderKL

    from sa_peft.models import resolve_model_path

    return AutoencoderKL.from_pretrained(resolve_model_path("builtin:digits"), subfolder="vae", use_safetensors=True)


def build_tokenizer():
    from sa_peft.testing.tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(tmp, " ".join(PROMPTS).split())
    tokenizer.model_max_length = TOKENS  # saved in tokenizer_config.json; SD3's pipeline pads CLIP prompts to it
    return tokenizer


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKENS, projection_dim=PROJECTION_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_transformer(num_layers: int, width: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=16, num_attention_heads=width // 16, joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=width, pooled_projection_dim=2 * PROJECTION_DIM, pos_embed_max_size=IMAGE_SIZE // 2,
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


# ------------------------------------------------------------------- conditioning and the counted context


def clip_conditioning(text_encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context [P, 8, 64], pooled [P, 64])`` as ``StableDiffusion3Pipeline.encode_prompt`` makes the CLIP part:
    each encoder's penultimate hidden states joined along the width, and their projected pooled outputs."""
    outs = [te(ids, output_hidden_states=True) for te in text_encoders]
    return torch.cat([o.hidden_states[-2] for o in outs], -1), torch.cat([o.text_embeds for o in outs], -1)


def with_zero_tokens(context: torch.Tensor, count: int) -> torch.Tensor:
    """The context followed by ``count`` zero rows (the pipeline's T5 part when there is no T5)."""
    return torch.cat([context, context.new_zeros(context.shape[0], count, context.shape[2])], 1)


class CountedJointAttnProcessor:
    """``JointAttnProcessor2_0`` for a context whose last token stands for ``count`` identical tokens.

    n identical keys (and values) get n times one key's softmax weight, which is one key with + log n on its logit;
    queries of identical tokens give identical rows, so the copies stay identical in every block.
    """

    def __init__(self, count: int):
        self.log_count = math.log(count)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n_image = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        cq, ck, cv = (heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
                      heads(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_q is not None or attn.norm_added_q is not None:
            raise NotImplementedError("qk-norm is not used by this model")
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(q.shape[2], k.shape[2], dtype=q.dtype, device=q.device)  # [queries, keys]
        bias[:, -1] = self.log_count
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        image, context = out[:, :n_image], out[:, n_image:]
        image = attn.to_out[1](attn.to_out[0](image))
        if attn.context_pre_only:
            return image, context
        return image, attn.to_add_out(context)


@torch.no_grad()
def counted_context_error(transformer, generator: torch.Generator) -> float:
    """Largest |difference| between the stock transformer on the full context (8 CLIP + 256 zero tokens) and the
    counted one (8 + 1 with + log 256), on random inputs: ~1e-6 when the shortcut is exact."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    x = torch.randn(3, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2, generator=generator)
    context = torch.randn(3, TOKENS, transformer.config.joint_attention_dim, generator=generator)
    pooled = torch.randn(3, transformer.config.pooled_projection_dim, generator=generator)
    t = torch.rand(3, generator=generator) * 1000
    transformer.set_attn_processor(JointAttnProcessor2_0())
    full = transformer(x, encoder_hidden_states=with_zero_tokens(context, T5_ZERO_TOKENS), pooled_projections=pooled,
                       timestep=t).sample
    transformer.set_attn_processor(CountedJointAttnProcessor(T5_ZERO_TOKENS))
    counted = transformer(x, encoder_hidden_states=with_zero_tokens(context, 1), pooled_projections=pooled,
                          timestep=t).sample
    transformer.set_attn_processor(JointAttnProcessor2_0())
    return (full - counted).abs().max().item()


# ------------------------------------------------------------------------------------------- training


def tokenize(tokenizer, prompts) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_transformer_and_text(transformer, text_encoders, tokenizer, scheduler, latents: torch.Tensor,
                               labels: torch.Tensor, steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3,
                               cfg_dropout: float = 0.1, separation_weight: float = 0.1,
                               ema_decay: float = 0.999) -> tuple[dict, EMA]:
    """Joint flow-matching training of the transformer and both CLIP encoders; returns timings and the EMA.

    ``latents``: [N, 2, 4, 8, 8], the VAE posterior's mean and std, already shifted and scaled (a fresh draw per
    step). As in the UNet script the encoders run once per step on the 11 distinct prompts.
    """
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from sa_peft.diffusion_loss import FlowMatchingNoise

    noise_sched = FlowMatchingNoise(scheduler, "logit_normal")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ids = tokenize(tokenizer, [*PROMPTS, ""])
    empty = len(PROMPTS)
    first_diff = int((ids[:empty] != ids[:1]).any(dim=0).int().argmax())
    modules = [transformer, *text_encoders]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 100))
    ema = EMA(modules, ema_decay)
    for m in modules:
        m.train()
    transformer.set_attn_processor(CountedJointAttnProcessor(T5_ZERO_TOKENS))
    start, recent, recent_sep = time.time(), [], []
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        cond = labels[idx].clone()
        cond[torch.rand(batch_size, generator=gen) < cfg_dropout] = empty
        mean, std = latents[idx, 0], latents[idx, 1]
        x0 = mean + std * torch.randn(mean.shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = noise_sched.sample_timesteps(batch_size, gen)
        noisy = noise_sched.add_noise(x0, noise, t)
        context, pooled = clip_conditioning(text_encoders, ids)
        pred = transformer(noisy, encoder_hidden_states=with_zero_tokens(context, 1)[cond],
                           pooled_projections=pooled[cond], timestep=t).sample
        mse = F.mse_loss(pred, noise - x0)
        # The per-position states from the digit word on (the context the transformer reads) and the pooled vector.
        sep = separation_penalty(torch.cat([context[:empty, first_diff:], pooled[:empty, None]], 1))
        loss = mse + separation_weight * sep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        recent.append(mse.item())
        recent_sep.append(sep.item())
        if (step + 1) % 100 == 0 or step == steps - 1:
            el = time.time() - start
            log(f"[transformer+text] step {step + 1}/{steps} mse {sum(recent) / len(recent):.4f} "
                f"cos² {sum(recent_sep) / len(recent_sep):.3f} ({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)")
            recent, recent_sep = [], []
    transformer.set_attn_processor(JointAttnProcessor2_0())
    for m in modules:
        m.eval()
    return {"transformer_steps": steps, "transformer_seconds": round(time.time() - start, 1)}, ema


@torch.no_grad()
def pipeline_context_error(pipe) -> float:
    """Largest |difference| between the conditioning training built (CLIP part + 256 zero rows, pooled) and the
    pipeline's own ``encode_prompt``, over the ten prompts and the empty one."""
    prompts = [*PROMPTS, ""]
    context, pooled = clip_conditioning([pipe.text_encoder, pipe.text_encoder_2], tokenize(pipe.tokenizer, prompts))
    embeds, _, pooled_pipe, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                   do_classifier_free_guidance=False)
    return max((with_zero_tokens(context, T5_ZERO_TOKENS) - embeds).abs().max().item(),
               (pooled - pooled_pipe).abs().max().item())


def declare_no_t5(folder: str) -> None:
    """``save_pretrained`` leaves a None component out of model_index.json, and ``from_pretrained`` then refuses the
    folder (it expects every component); ``[null, null]`` is how a folder says "none" (as SD's safety checker does)."""
    path = os.path.join(folder, "model_index.json")
    with open(path) as f:
        index = json.load(f)
    index.update({"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    with open(path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------ measuring


@torch.no_grad()
def prompt_embedding_stats(pipe) -> dict:
    """Pairwise cosines of the ten prompts' pooled projections and of their CLIP context from the digit word on."""
    ids = tokenize(pipe.tokenizer, PROMPTS)
    context, pooled = clip_conditioning([pipe.text_encoder, pipe.text_encoder_2], ids)
    first_diff = int((ids != ids[:1]).any(dim=0).int().argmax())
    off = ~torch.eye(len(PROMPTS), dtype=torch.bool)
    p = F.normalize(pooled, dim=-1)
    cos = p @ p.T
    h = F.normalize(context[:, first_diff:], dim=-1)
    per_token = torch.einsum("ptd,qtd->pqt", h, h).mean(2)
    return {"pooled_cosine_mean": round(cos[off].mean().item(), 4), "pooled_cosine_max": round(cos[off].max().item(), 4),
            "token_cosine_from_position": first_diff, "token_cosine_mean": round(per_token[off].mean().item(), 4),
            "token_cosine_max": round(per_token[off].max().item(), 4)}


def write_model_card(folder: str, facts: dict) -> None:
    from sa_peft.io_utils import write_text_atomic

    ev, emb, t = facts["evaluation"], facts["prompt_embeddings"], facts["timings"]
    ratio = facts["nn_train_samples"] / facts["nn_train_real"]
    rows = "\n".join(f"| `{p}` | {ev['per_prompt'][p]['accuracy']:.3f} | {ev['per_prompt'][p]['entropy']:.3f} |"
                     for p in PROMPTS if p in ev["per_prompt"])
    params = facts["params"]
    text = f"""# builtin:digits-sd3 — a small SD3-shaped flow-matching model of handwritten digits

Trained from a fixed seed by `examples/digits/train_digits_sd3_model.py` (one CPU thread) on the same data,
split (seed {facts['seed']}, {facts['num_train']} training images) and prompts as `builtin:digits`:
exactly `a handwritten digit zero` … `a handwritten digit nine`; unconditional prompt `""`.

## Recommended sampling
The pipeline's own `FlowMatchEulerDiscreteScheduler` (shift 1), **{facts['num_inference_steps']} steps, guidance
scale {facts['guidance_scale']}**, 16×16 output:

```python
from sa_peft import load_pipeline
pipe = load_pipeline("builtin:digits-sd3", supported=("StableDiffusion3Pipeline",))
images = pipe("a handwritten digit seven", num_inference_steps={facts['num_inference_steps']},
              guidance_scale={facts['guidance_scale']}, output_type="pt").images  # 1×1×16×16 in [0, 1]
```

## Components
| part | configuration | parameters |
|---|---|---|
| VAE | `builtin:digits`' AutoencoderKL (weights unchanged), latent 4×8×8; `shift_factor` {facts['shift_factor']:.4f} (training latents' mean), `scaling_factor` {facts['scaling_factor']:.4f} (1/std around it) | {params['vae']:,} |
| text encoders | two CLIPTextModelWithProjection, {TEXT_WIDTH} wide, 2 layers, projection {PROJECTION_DIM}, the repository's tokenizer cut to {TOKENS} tokens ({facts['vocab_size']} tokens of vocabulary); trained jointly with the transformer | {params['text_encoder']:,} + {params['text_encoder_2']:,} |
| T5 | none (`text_encoder_3=None`): the pipeline appends {T5_ZERO_TOKENS} zero rows to the context | 0 |
| transformer | SD3Transformer2DModel, {facts['num_layers']} joint blocks, {facts['width']} wide ({facts['width'] // 16} heads × 16), patch 2 (16 image tokens) | {params['transformer']:,} |

Folder size: {facts['size_bytes'] / 1e6:.2f} MB (safetensors, fp32).

## Training
- Flow matching (x_σ = (1−σ)·x₀ + σ·ε, target ε − x₀, σ logit-normal), {t['transformer_steps']} steps, batch 64, AdamW
  lr {facts['lr']}, cosine decay, 10 % empty-prompt dropout, EMA {facts['ema_decay']}, plus {facts['separation_weight']} ×
  the mean squared pairwise cosine of the ten prompts' context rows (from the digit word on) and pooled projections;
  {t['transformer_seconds']:.0f} s. The {T5_ZERO_TOKENS} identical zero rows are trained as one row whose attention
  logit gets + log {T5_ZERO_TOKENS} (exact; checked at start-up: max |difference| {facts['counted_context_error']:.1e}).
- Wall time on one thread: training {t['training_seconds'] / 60:.1f} min, with saving and the evaluation below
  {t['total_seconds'] / 60:.1f} min (torch {facts['torch']}; {facts['cpu']}).

## Prompt embeddings
Pooled projections of the ten prompts: pairwise cosine mean {emb['pooled_cosine_mean']:.3f}, max {emb['pooled_cosine_max']:.3f};
context rows from the digit word on (position {emb['token_cosine_from_position']}): mean {emb['token_cosine_mean']:.3f},
max {emb['token_cosine_max']:.3f}.

## Measured quality ({ev['num_per_prompt']} samples per prompt, seed {ev['seed']}, {facts['num_inference_steps']} Euler steps, guidance {facts['guidance_scale']})
Scored by `builtin:digits-classifier`.

| prompt | accuracy | mean entropy (nats) |
|---|---|---|
{rows}

- Mean accuracy {ev['retained']['mean_accuracy']:.4f}, worst {ev['retained']['worst_accuracy']:.3f} (`{ev['retained']['worst_prompt']}`).
- Fréchet distance to the held-out digits in classifier feature space: {ev['quality']['frechet_distance']:.3f}
  (held-out half vs half: {ev['quality']['frechet_distance_real_split']:.3f}).
- Off-manifold rate: {ev['quality']['off_manifold_rate']:.3f} (real digits: 0.05 by construction).
- Memorisation check: median pixel distance to the nearest training image — samples {facts['nn_train_samples']:.3f},
  held-out real digits {facts['nn_train_real']:.3f} (ratio {ratio:.2f}).
- Sampling and scoring {ev['num_per_prompt'] * len(ev['per_prompt'])} images took {ev['timing']['total_seconds']:.0f} s on one
  thread: the {T5_ZERO_TOKENS} zero rows make each step ~10× the work of the 16 image tokens alone.
{sweep_text(facts.get('guidance_sweep'))}"""
    write_text_atomic(os.path.join(folder, "README.md"), text)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=os.path.join(REPO_ROOT, "sa_peft", "builtin", "digits-sd3"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--separation_weight", type=float, default=0.1)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--eval_images_per_prompt", type=int, default=50)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--guidance_sweep", type=float, nargs="*", default=[])
    p.add_argument("--rewrite_card", action="store_true",
                   help="only rewrite README.md in --output_dir from its training_facts.json (no training)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, REPO_ROOT)
    from diffusers import StableDiffusion3Pipeline

    from sa_peft.classifier import load_classifier
    from sa_peft.evaluation import _without_samples, evaluate_pipeline
    from sa_peft.models import SD3_PIPELINE, load_pipeline

    if args.rewrite_card:
        with open(os.path.join(args.output_dir, "training_facts.json")) as f:
            write_model_card(args.output_dir, json.load(f))
        return

    t_total = time.time()
    split = load_digit_split(args.seed)
    classifier = load_classifier("builtin:digits-classifier")
    vae = load_digits_vae()
    with torch.no_grad():
        mean, std = encode_stats(vae, split.train_images)
        draw = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(args.seed))
        shift, scale = draw.mean().item(), 1.0 / draw.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = torch.stack([(mean - shift) * scale, std * scale], 1)
    log(f"[vae] builtin:digits VAE; shift_factor {shift:.4f}, scaling_factor {scale:.4f}")

    tokenizer = build_tokenizer()
    torch.manual_seed(args.seed + 2)
    text_encoders = [build_text_encoder(tokenizer), build_text_encoder(tokenizer)]
    torch.manual_seed(args.seed + 3)
    transformer = build_transformer(args.num_layers, args.width)
    error = counted_context_error(transformer, torch.Generator().manual_seed(args.seed))
    log(f"[check] counted zero rows vs the full context: max |difference| {error:.2e}")
    if error > 1e-4:
        raise RuntimeError(f"the counted context differs from the full one by {error}; the shortcut is not exact")
    scheduler = build_scheduler()
    timings, ema = train_transformer_and_text(transformer, text_encoders, tokenizer, scheduler, latents,
                                              split.train_labels, args.steps, args.seed + 4, lr=args.lr,
                                              separation_weight=args.separation_weight, ema_decay=args.ema_decay)
    ema.copy_to([transformer, *text_encoders])
    timings["training_seconds"] = round(time.time() - t_total, 1)

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1],
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        declare_no_t5(staging)
        pipe = load_pipeline(staging, supported=(SD3_PIPELINE,))
        context_error = pipeline_context_error(pipe)
        log(f"[check] training's conditioning vs the pipeline's encode_prompt: max |difference| {context_error:.2e}")
        if context_error > 1e-5:
            raise RuntimeError(f"training conditioned the transformer differently from the pipeline ({context_error})")
        emb = prompt_embedding_stats(pipe)
        log(f"[text] pooled cosine mean {emb['pooled_cosine_mean']:.3f}; per-token mean {emb['token_cosine_mean']:.3f}")
        labels = {p: i for i, p in enumerate(PROMPTS)}
        metrics = evaluate_pipeline(pipe, classifier, list(PROMPTS), labels, [], [],
                                    num_per_prompt=args.eval_images_per_prompt, seed=args.seed,
                                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
        for p, m in metrics["per_prompt"].items():
            log(f"[eval] {p}: accuracy {m['accuracy']:.3f}")
        q = metrics["quality"]
        log(f"[eval] mean {metrics['retained']['mean_accuracy']:.4f} worst {metrics['retained']['worst_accuracy']:.3f}; "
            f"FD {q['frechet_distance']:.3f}; off-manifold {q['off_manifold_rate']:.3f}; "
            f"{metrics['timing']['total_seconds']:.0f}s")
        samples = torch.cat(list(metrics["samples"].values()))
        sweep = measure_guidance(pipe, classifier, args.guidance_sweep, 30, args.seed, args.num_inference_steps)
        timings["total_seconds"] = round(time.time() - t_total, 1)
        facts = {
            "seed": args.seed, "num_train": len(split.train_labels), "num_test": len(split.test_labels),
            "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
            "shift_factor": shift, "scaling_factor": scale, "vocab_size": len(tokenizer), "tokens": TOKENS,
            "num_layers": args.num_layers, "width": args.width, "counted_context_error": error,
            "params": {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                       for name in ("vae", "text_encoder", "text_encoder_2", "transformer")},
            "size_bytes": folder_size(staging), "timings": timings, "lr": args.lr, "ema_decay": args.ema_decay,
            "separation_weight": args.separation_weight, "prompt_embeddings": emb,
            "nn_train_samples": nearest_distances(samples, split.train_images).median().item(),
            "nn_train_real": nearest_distances(split.test_images, split.train_images).median().item(),
            "guidance_sweep": sweep, "torch": torch.__version__, "cpu": f"1 thread of {cpu_name()}",
            "evaluation": _without_samples(metrics), "pipeline_context_error": context_error,
        }
        write_model_card(staging, facts)
        with open(os.path.join(staging, "training_facts.json"), "w") as f:
            json.dump(facts, f, indent=2)
        make_readable(staging)
        replace_folder(staging, args.output_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    log(f"saved {args.output_dir} ({facts['size_bytes'] / 1e6:.2f} MB) in {timings['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
