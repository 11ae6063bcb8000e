"""Train the built-in ``builtin:digits`` text-to-image model and its ``builtin:digits-classifier``.

A small but real Stable-Diffusion-shaped pipeline (AutoencoderKL + CLIPTextModel + cross-attention
UNet2DConditionModel + DDPM scheduler) on scikit-learn's 8×8 handwritten digits, upsampled to 16×16.
The prompts are exactly ``a handwritten digit zero`` … ``a handwritten digit nine``. Everything runs
from a fixed seed on one CPU thread in about 20 minutes:

    OMP_NUM_THREADS=1 python examples/digits/train_digits_model.py

Stages: (1) a CNN classifier on the real training split (scores samples in evaluation);
(2) the VAE; (3) the text encoder and UNet, trained jointly with classifier-free-guidance dropout;
(4) save the pipeline with safetensors, reload it, measure it, and write the model card.
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = tuple(f"a handwritten digit {w}" for w in DIGIT_WORDS)
IMAGE_SIZE = 16
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class DigitSplit:
    """Images ``[N, 1, 16, 16]`` in [0, 1] and integer labels, for the train and held-out parts."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digit_split(seed: int = 0, test_size: float = 0.2) -> DigitSplit:
    """scikit-learn digits, bilinear 8×8 → 16×16, stratified split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=test_size, stratify=labels.numpy(), random_state=seed)
    train_idx, test_idx = torch.as_tensor(sorted(train_idx)), torch.as_tensor(sorted(test_idx))
    return DigitSplit(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def random_affine(images: torch.Tensor, generator: torch.Generator, max_rotation: float = 10.0,
                  max_scale: float = 0.1, max_shift: float = 1.5) -> torch.Tensor:
    """Small random rotations, scalings and shifts (in pixels), so the classifier tolerates sample jitter."""
    n, _, h, _ = images.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rotation)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_scale
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift * 2 / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


# ----------------------------------------------------------------------------------------- classifier


def train_classifier(split: DigitSplit, seed: int, epochs: int, batch_size: int = 64, lr: float = 2e-3):
    """Train ``DigitsCNN`` on the training split with light augmentation; returns a ``DigitsClassifier``."""
    from sa_peft.classifier import DigitsClassifier, DigitsCNN

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitsCNN(num_classes=len(DIGIT_WORDS))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n = len(split.train_labels)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.time()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            x = random_affine(split.train_images[idx], gen) * 2 - 1
            loss = F.cross_entropy(net(x), split.train_labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            log(f"[classifier] epoch {epoch + 1}/{epochs} loss {total / n:.4f} ({time.time() - start:.0f}s)")
    return DigitsClassifier(net.eval(), list(DIGIT_WORDS), image_size=IMAGE_SIZE, in_channels=1,
                            reference_images=split.test_images.clone(), reference_labels=split.test_labels.clone())


# ------------------------------------------------------------------------------------------------ VAE


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE,
    )


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0: the learning-rate multiplier for ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, images: torch.Tensor, steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-3) -> dict:
    """Reconstruction MSE on [-1, 1] plus a small KL (per latent element) that keeps latents smooth."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = images * 2 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 50))
    vae.train()
    start, recent = time.time(), []
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent.append(mse.item())
        if (step + 1) % 100 == 0 or step == steps - 1:
            el = time.time() - start
            log(f"[vae] step {step + 1}/{steps} mse {sum(recent) / len(recent):.5f} kl {kl.item():.3f} "
                f"({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)")
            recent = []
    vae.eval()
    return {"vae_steps": steps, "vae_seconds": round(time.time() - start, 1)}


@torch.no_grad()
def encode_stats(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ``[N, 4, 8, 8]`` of images in [0, 1]."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i : i + batch_size] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------------- text and UNet


def build_text_encoder(tokenizer, hidden_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    # Stable Diffusion's training schedule, so the engine treats this model like SD 1.x.
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="epsilon", steps_offset=1, clip_sample=False)


def tokenize(tokenizer, prompts) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline.encode_prompt`` makes them (padded to 77)."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def separation_penalty(hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between different prompts' hidden states, position by position (0 when orthogonal).

    ``hidden`` is ``[P, T, D]``: the positions from the first one where the prompts differ, which
    includes the pooled (first EOS) position and the EOS padding the UNet also attends to.
    """
    z = F.normalize(hidden, dim=-1).transpose(0, 1)
    cos = z @ z.transpose(1, 2)
    off = ~torch.eye(hidden.shape[0], dtype=torch.bool)
    return cos[:, off].pow(2).mean()


class EMA:
    """Exponential moving average of parameters, with the usual short warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        targets = [p for m in modules for p in m.parameters()]
        for s, p in zip(self.shadow, targets):
            p.copy_(s)


def train_unet_and_text(unet, text_encoder, tokenizer, scheduler, latent_mean: torch.Tensor, latent_std: torch.Tensor,
                        labels: torch.Tensor, scaling_factor: float, steps: int, seed: int, batch_size: int = 64,
                        lr: float = 1e-3, cfg_dropout: float = 0.1, separation_weight: float = 0.1,
                        ema_decay: float = 0.999) -> tuple[dict, EMA]:
    """Joint ε-prediction training of UNet and text encoder; returns timings and the EMA weights.

    The text encoder runs once per step on the 11 distinct prompts (ten digits and the empty
    prompt) and each sample picks its row, which is exact and ~6× cheaper than encoding the batch.
    A small penalty on the pairwise cosine of the prompts' hidden states (from the digit word on,
    pooled EOS included) keeps the ten prompts apart, so an edit aimed at one prompt does not leak
    into the others through near-identical conditioning; without it they stay at cosine ≈ 0.99.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ids = tokenize(tokenizer, [*PROMPTS, ""])
    empty = len(PROMPTS)
    first_diff = int((ids[:empty] != ids[:1]).any(dim=0).int().argmax())
    alphas = scheduler.alphas_cumprod
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 100))
    ema = EMA([unet, text_encoder], ema_decay)
    unet.train()
    text_encoder.train()
    start, recent, recent_sep = time.time(), [], []
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        cond = labels[idx].clone()
        cond[torch.rand(batch_size, generator=gen) < cfg_dropout] = empty
        x0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden = text_encoder(ids).last_hidden_state
        pred = unet(xt, t, hidden[cond]).sample
        mse = F.mse_loss(pred, noise)
        sep = separation_penalty(hidden[:empty, first_diff:])
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
            log(f"[unet+text] step {step + 1}/{steps} mse {sum(recent) / len(recent):.4f} "
                f"cos² {sum(recent_sep) / len(recent_sep):.3f} ({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)")
            recent, recent_sep = [], []
    unet.eval()
    text_encoder.eval()
    return {"unet_steps": steps, "unet_seconds": round(time.time() - start, 1)}, ema


# -------------------------------------------------------------------------------------- measurements


@torch.no_grad()
def prompt_embedding_stats(pipe, prompts=PROMPTS) -> dict:
    """Pairwise cosines of the prompts' pooled embeddings and of their per-token hidden states.

    Tokens before the digit word are identical for every prompt (CLIP's attention is causal), so
    the per-token comparison covers the digit word and every later position (EOS and padding),
    which is what differs and what the UNet's cross-attention can tell apart.
    """
    tok = pipe.tokenizer
    ids = tokenize(tok, prompts)
    out = pipe.text_encoder(ids)
    pooled = F.normalize(out.pooler_output, dim=-1)
    cos = pooled @ pooled.T
    off = ~torch.eye(len(prompts), dtype=torch.bool)
    first_diff = int((ids != ids[:1]).any(dim=0).int().argmax())
    hidden = out.last_hidden_state[:, first_diff:]
    per_token = torch.einsum("ptd,qtd->pqt", F.normalize(hidden, dim=-1), F.normalize(hidden, dim=-1))
    per_token_mean = per_token.mean(dim=2)
    flat = F.normalize(out.last_hidden_state.flatten(1), dim=-1)
    return {
        "pooled_cosine_matrix": [[round(v, 3) for v in row] for row in cos.tolist()],
        "pooled_cosine_max": round(cos[off].max().item(), 4),
        "pooled_cosine_mean": round(cos[off].mean().item(), 4),
        "token_cosine_from_position": first_diff,
        "token_cosine_mean": round(per_token_mean[off].mean().item(), 4),
        "token_cosine_max": round(per_token_mean[off].max().item(), 4),
        "hidden_states_cosine_mean": round((flat @ flat.T)[off].mean().item(), 4),
        "hidden_states_cosine_max": round((flat @ flat.T)[off].max().item(), 4),
    }


@torch.no_grad()
def nearest_distances(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Euclidean distance from each query image to its nearest gallery image (pixel space)."""
    return torch.cdist(queries.flatten(1), gallery.flatten(1)).min(dim=1).values


def replace_folder(src: str, dst: str) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` with two renames."""
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(dst)))
        os.rmdir(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old:
        shutil.rmtree(old)


def make_readable(folder: str) -> None:
    """mkdtemp and safetensors' temp files are owner-only; a shipped model folder should be world-readable."""
    os.chmod(folder, 0o755)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"


def folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(folder) for f in files)


def write_model_card(folder: str, facts: dict) -> None:
    """The model card (README.md) with the recommended sampling settings and the measured numbers."""
    from sa_peft.io_utils import write_text_atomic

    ev = facts["evaluation"]
    emb = facts["prompt_embeddings"]
    ratio = facts["nn_train_samples"] / facts["nn_train_real"]
    novelty = (", so samples are about as novel as unseen real digits" if ratio >= 0.8
               else "; samples sit closer to the training set than unseen digits do: possible memorisation")
    order = sorted(ev["per_prompt"], key=lambda p: PROMPTS.index(p) if p in PROMPTS else len(PROMPTS))
    rows = "\n".join(
        f"| `{p}` | {ev['per_prompt'][p]['accuracy']:.3f} | {ev['per_prompt'][p]['entropy']:.3f} |" for p in order
    )
    text = f"""# builtin:digits — a small Stable-Diffusion-shaped model of handwritten digits

Trained from a fixed seed by `examples/digits/train_digits_model.py` (one CPU thread) on scikit-learn's
`load_digits` (8×8 bilinear → 16×16, [-1, 1]); 80/20 stratified split (seed {facts['seed']}), trained on
the {facts['num_train']} training images only; the {facts['num_test']} held-out images are the
reference set of `builtin:digits-classifier`.

Prompts: exactly `a handwritten digit zero` … `a handwritten digit nine`. Unconditional (CFG) prompt: `""`.

## Recommended sampling
DDIM, **{facts['num_inference_steps']} steps, guidance scale {facts['guidance_scale']}**, eta 0, 16×16 output:

```python
from diffusers import DDIMScheduler
from sa_peft import load_pipeline
pipe = load_pipeline("builtin:digits")
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
images = pipe("a handwritten digit seven", num_inference_steps={facts['num_inference_steps']},
              guidance_scale={facts['guidance_scale']}, output_type="pt").images  # 1×1×16×16 in [0, 1]
```
The saved scheduler is the training `DDPMScheduler` (SD 1.x scaled-linear betas, 1,000 steps, ε-prediction,
`steps_offset=1`, `clip_sample=False`); `sa_peft.evaluation.generate_samples` switches to DDIM itself.

## Components
| part | configuration | parameters |
|---|---|---|
| VAE | AutoencoderKL, 1 channel in/out, blocks (16, 32), latent 4×8×8, `scaling_factor` {facts['scaling_factor']:.4f} (1/std of training latents) | {facts['params']['vae']:,} |
| text encoder | CLIPTextModel, {facts['text_hidden_size']} wide, 2 layers, 4 heads, own tokenizer ({facts['vocab_size']} tokens); trained jointly with the UNet | {facts['params']['text_encoder']:,} |
| UNet | UNet2DConditionModel, blocks (32, 64), cross-attention in both and in the mid block | {facts['params']['unet']:,} |

Folder size: {facts['size_bytes'] / 1e6:.2f} MB (safetensors, fp32).

## Training
- Classifier: {facts['timings']['classifier_seconds']:.0f} s. VAE: {facts['timings']['vae_steps']} steps, batch 64, {facts['timings']['vae_seconds']:.0f} s;
  held-out reconstruction MSE (in [0, 1]) {facts['vae_recon_mse']:.5f}; the classifier is {facts['vae_recon_accuracy']:.3f} accurate on held-out reconstructions.
- UNet + text encoder: {facts['timings']['unet_steps']} steps, batch 64, AdamW lr {facts['lr']}, cosine decay, 10 % empty-prompt
  dropout, EMA {facts['ema_decay']}, plus {facts['separation_weight']} × the mean squared pairwise cosine of the ten prompts'
  hidden states (each position from the digit word on, pooled EOS included) so the prompts stay apart;
  {facts['timings']['unet_seconds']:.0f} s.
- Wall time on one thread: training {facts['timings']['training_seconds'] / 60:.1f} min, with saving and the
  evaluation below {facts['timings']['total_seconds'] / 60:.1f} min (torch {facts['torch']}; {facts['cpu']}).

## Prompt embeddings
Pooled embeddings of the ten prompts: pairwise cosine mean {emb['pooled_cosine_mean']:.3f}, max {emb['pooled_cosine_max']:.3f}.
Per-token hidden states from the digit word on (position {emb['token_cosine_from_position']}; earlier tokens are
identical by causal attention): mean per-token cosine {emb['token_cosine_mean']:.3f}, max {emb['token_cosine_max']:.3f}.
Whole 77-token hidden states: mean cosine {emb['hidden_states_cosine_mean']:.3f}.

## Measured quality ({ev['num_per_prompt']} samples per prompt, seed {ev['seed']}, DDIM {facts['num_inference_steps']}, guidance {facts['guidance_scale']})
Scored by `builtin:digits-classifier` (held-out accuracy {facts['classifier_accuracy']:.4f}).

| prompt | accuracy | mean entropy (nats) |
|---|---|---|
{rows}

- Mean accuracy {ev['retained']['mean_accuracy']:.4f}, worst {ev['retained']['worst_accuracy']:.3f} (`{ev['retained']['worst_prompt']}`).
- Fréchet distance to the held-out digits in classifier feature space: {ev['quality']['frechet_distance']:.3f}
  (held-out half vs half: {ev['quality']['frechet_distance_real_split']:.3f}).
- Off-manifold rate (pixel-space distance to the nearest held-out digit above the real digits' 95th
  percentile): {ev['quality']['off_manifold_rate']:.3f} (real digits: 0.05 by construction).
- Memorisation check: median pixel distance to the nearest training image — samples {facts['nn_train_samples']:.3f},
  held-out real digits {facts['nn_train_real']:.3f} (ratio {ratio:.2f}; a model that copied training images would be
  near 0{novelty}).
- Sampling and scoring {ev['num_per_prompt'] * len(ev['per_prompt'])} images took {ev['timing']['total_seconds']:.0f} s on one thread.
{sweep_text(facts.get('guidance_sweep'))}"""
    write_text_atomic(os.path.join(folder, "README.md"), text)


def sweep_text(sweep: list[dict] | None) -> str:
    """Model-card lines for other guidance scales (why the recommended one is recommended)."""
    if not sweep:
        return ""
    rows = "\n".join(
        f"| {r['guidance_scale']} | {r['mean_accuracy']:.3f} | {r['worst_accuracy']:.3f} | {r['frechet_distance']:.2f} | "
        f"{r['off_manifold_rate']:.3f} |" for r in sweep
    )
    n, steps = sweep[0]["num_per_prompt"], sweep[0].get("num_inference_steps", 25)
    return f"""
Other guidance scales ({n} samples per prompt, DDIM {steps}; Fréchet distances from fewer samples run higher,
so compare within this table): low guidance loses some accuracy, high guidance drifts away from real digits.

| guidance | mean accuracy | worst accuracy | Fréchet distance | off-manifold |
|---|---|---|---|---|
{rows}
"""


def measure_guidance(pipe, classifier, scales: list[float], num_per_prompt: int, seed: int, steps: int) -> list[dict]:
    """Accuracy and quality at other guidance scales."""
    from sa_peft.evaluation import evaluate_pipeline

    out = []
    for g in scales:
        m = evaluate_pipeline(pipe, classifier, list(PROMPTS), {p: i for i, p in enumerate(PROMPTS)}, [], [],
                              num_per_prompt=num_per_prompt, seed=seed, num_inference_steps=steps, guidance_scale=g)
        out.append({"guidance_scale": g, "num_per_prompt": num_per_prompt, "num_inference_steps": steps,
                    "mean_accuracy": m["retained"]["mean_accuracy"], "worst_accuracy": m["retained"]["worst_accuracy"],
                    "frechet_distance": m["quality"]["frechet_distance"],
                    "off_manifold_rate": m["quality"]["off_manifold_rate"]})
        log(f"[eval] guidance {g}: accuracy {out[-1]['mean_accuracy']:.3f}, FD {out[-1]['frechet_distance']:.2f}")
    return out


def write_classifier_card(folder: str, accuracy: float, num_test: int, num_params: int, seconds: float) -> None:
    from sa_peft.io_utils import write_text_atomic

    write_text_atomic(os.path.join(folder, "README.md"), f"""# builtin:digits-classifier

A {num_params:,}-parameter CNN (`sa_peft.classifier.DigitsCNN`) trained by `examples/digits/train_digits_model.py`
on the same 80 % training split of scikit-learn digits (16×16, light affine augmentation) in {seconds:.0f} s.
Held-out accuracy: **{accuracy:.4f}** on {num_test} images.

- `model.safetensors`, `config.json`: load with `sa_peft.classifier.load_classifier("builtin:digits-classifier")`.
- `reference_images.safetensors`: the {num_test} held-out digits (`images` [N, 1, 16, 16] in [0, 1], `labels`),
  the real reference for Fréchet distance and off-manifold rate.
- Features for the Fréchet distance: the 64 post-ReLU penultimate activations.
""")


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=os.path.join(REPO_ROOT, "sa_peft", "builtin", "digits"))
    p.add_argument("--classifier_output_dir", default=os.path.join(REPO_ROOT, "sa_peft", "builtin", "digits-classifier"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier_epochs", type=int, default=40)
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--unet_steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--text_hidden_size", type=int, default=32)
    p.add_argument("--separation_weight", type=float, default=0.1)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--eval_images_per_prompt", type=int, default=100)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--guidance_sweep", type=float, nargs="*", default=[],
                   help="also measure these guidance scales (30 samples per prompt each) for the model card")
    p.add_argument("--skip_classifier", action="store_true", help="reuse the classifier in --classifier_output_dir")
    p.add_argument("--rewrite_card", action="store_true",
                   help="only rewrite README.md in --output_dir from its training_facts.json (no training)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, REPO_ROOT)
    from diffusers import StableDiffusionPipeline

    from sa_peft.classifier import load_classifier
    from sa_peft.evaluation import _without_samples, evaluate_pipeline
    from sa_peft.models import load_pipeline
    from sa_peft.testing.tokenizer import write_clip_tokenizer

    if args.rewrite_card:
        with open(os.path.join(args.output_dir, "training_facts.json")) as f:
            write_model_card(args.output_dir, json.load(f))
        log(f"rewrote {os.path.join(args.output_dir, 'README.md')}")
        return

    t_total = time.time()
    split = load_digit_split(args.seed)
    log(f"data: {len(split.train_labels)} train / {len(split.test_labels)} held-out images")
    timings: dict = {}

    # (1) Classifier.
    t0 = time.time()
    if args.skip_classifier:
        classifier = load_classifier(args.classifier_output_dir)
    else:
        classifier = train_classifier(split, args.seed, args.classifier_epochs)
    timings["classifier_seconds"] = round(time.time() - t0, 1)
    accuracy = (classifier.predict(split.test_images) == split.test_labels).float().mean().item()
    num_cls_params = sum(p.numel() for p in classifier.net.parameters())
    log(f"[classifier] held-out accuracy {accuracy:.4f} ({num_cls_params:,} params)")
    if not args.skip_classifier:
        classifier.save(args.classifier_output_dir, {"heldout_accuracy": round(accuracy, 4), "seed": args.seed})
        write_classifier_card(args.classifier_output_dir, accuracy, len(split.test_labels), num_cls_params,
                              timings["classifier_seconds"])
        make_readable(args.classifier_output_dir)

    # (2) VAE.
    torch.manual_seed(args.seed + 1)
    vae = build_vae()
    timings.update(train_vae(vae, split.train_images, args.vae_steps, args.seed + 1))
    with torch.no_grad():
        mean, std = encode_stats(vae, split.train_images)
        latents = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(args.seed))
        scaling_factor = 1.0 / latents.std().item()
        test_mean, _ = encode_stats(vae, split.test_images)
        recon = ((vae.decode(test_mean).sample + 1) / 2).clamp(0, 1)
    vae.register_to_config(scaling_factor=scaling_factor)
    recon_mse = F.mse_loss(recon, split.test_images).item()
    recon_acc = (classifier.predict(recon) == split.test_labels).float().mean().item()
    log(f"[vae] scaling_factor {scaling_factor:.4f}; held-out recon mse {recon_mse:.5f}, classifier acc {recon_acc:.4f}")

    # (3) Text encoder + UNet.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(tmp, " ".join(PROMPTS).split())
    torch.manual_seed(args.seed + 2)
    text_encoder = build_text_encoder(tokenizer, args.text_hidden_size)
    torch.manual_seed(args.seed + 3)
    unet = build_unet(args.text_hidden_size)
    scheduler = build_scheduler()
    info, ema = train_unet_and_text(unet, text_encoder, tokenizer, scheduler, mean, std, split.train_labels,
                                    scaling_factor, args.unet_steps, args.seed + 4, lr=args.lr,
                                    separation_weight=args.separation_weight, ema_decay=args.ema_decay)
    timings.update(info)
    ema.copy_to([unet, text_encoder])
    timings["training_seconds"] = round(time.time() - t_total, 1)

    # (4) Save, reload from disk, measure, write the card.
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        pipe = load_pipeline(staging)
        emb = prompt_embedding_stats(pipe)
        log(f"[text] pooled cosine mean {emb['pooled_cosine_mean']:.3f} max {emb['pooled_cosine_max']:.3f}; "
            f"per-token mean {emb['token_cosine_mean']:.3f}")
        metrics = evaluate_pipeline(pipe, classifier, list(PROMPTS), {p: i for i, p in enumerate(PROMPTS)}, [], [],
                                    num_per_prompt=args.eval_images_per_prompt, seed=args.seed,
                                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
        for p, m in metrics["per_prompt"].items():
            log(f"[eval] {p}: accuracy {m['accuracy']:.3f}")
        q = metrics["quality"]
        log(f"[eval] mean {metrics['retained']['mean_accuracy']:.4f} worst {metrics['retained']['worst_accuracy']:.3f}; "
            f"FD {q['frechet_distance']:.3f} (real split {q['frechet_distance_real_split']:.3f}); "
            f"off-manifold {q['off_manifold_rate']:.3f}; {metrics['timing']['total_seconds']:.0f}s")
        samples = torch.cat(list(metrics["samples"].values()))
        nn_samples = nearest_distances(samples, split.train_images).median().item()
        nn_real = nearest_distances(split.test_images, split.train_images).median().item()
        sweep = measure_guidance(pipe, classifier, args.guidance_sweep, 30, args.seed, args.num_inference_steps)
        timings["total_seconds"] = round(time.time() - t_total, 1)
        facts = {
            "guidance_sweep": sweep,
            "seed": args.seed, "num_train": len(split.train_labels), "num_test": len(split.test_labels),
            "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
            "scaling_factor": scaling_factor, "text_hidden_size": args.text_hidden_size, "vocab_size": len(tokenizer),
            "params": {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                       for name in ("vae", "text_encoder", "unet")},
            "size_bytes": folder_size(staging), "timings": timings, "vae_recon_mse": recon_mse,
            "vae_recon_accuracy": recon_acc, "lr": args.lr, "ema_decay": args.ema_decay,
            "separation_weight": args.separation_weight, "prompt_embeddings": emb, "classifier_accuracy": accuracy,
            "nn_train_samples": nn_samples, "nn_train_real": nn_real, "torch": torch.__version__,
            "cpu": f"1 thread of {cpu_name()}", "evaluation": _without_samples(metrics),
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
