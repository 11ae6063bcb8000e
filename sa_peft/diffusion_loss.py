"""The diffusion training loss ℓ, written once for the objective, the Fisher and the forgetting signal.

Two model families, dispatched here and nowhere else:
- UNets (SD 1.x/2.x, SDXL): DDPM noising √ᾱ·x₀ + √(1−ᾱ)·ε at integer timesteps drawn uniformly, ε or v target;
- flow-matching transformers (SD3, FLUX): x_σ = (1−σ)·x₀ + σ·ε with σ from the SD3 timestep density, target ε − x₀
  (``FlowMatchingNoise``), as diffusers' ``train_dreambooth_lora_sd3.py`` and ``_flux.py`` train them; FLUX's
  transformer sees the noisy latents packed into 2×2 patches with their image ids (``model_prediction``).
The training "scheduler" passed around (``noise_scheduler_for``) is a ``DDPMScheduler`` or a ``FlowMatchingNoise``;
both have ``config.num_train_timesteps``, ``config.prediction_type`` and ``add_noise``.
"""

from __future__ import annotations

import math

import torch

from .errors import InputError

# The prediction_type of FlowMatchingNoise: the model predicts the velocity v = ε − x₀.
FLOW_MATCHING = "flow_matching"
# Points of the grid that finds the uniform draws of the timesteps ≥ `forget_min_timestep` (FlowMatchingNoise.uniform_range).
FLOW_RANGE_GRID = 2**16
# diffusers' SD3 script's --weighting_scheme choices (its default first); "none" samples σ's index uniformly.
WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "none")


class FlowMatchingNoise:
    """Training-time noising of a flow-matching model, from its pipeline's ``FlowMatchEulerDiscreteScheduler``.

    As diffusers' SD3 LoRA script: u from the ``weighting_scheme``'s density (``compute_density_for_timestep_sampling``),
    index ⌊u·T⌋ into the scheduler's training timesteps (SD3's shifted schedule, σ·T, descending), the transformer
    called with that timestep, x_σ = (1−σ)·x₀ + σ·ε, target ε − x₀ and the loss weighted by
    ``compute_loss_weighting_for_sd3`` (1 for logit_normal, mode and none). Timesteps are floats σ·T, so σ = t / T
    (the scheduler's own ``timesteps = sigmas · T``). Every draw is a function of a uniform u from a torch generator,
    so K stratified timesteps (the Fisher, the forgetting signal) stratify the same density.
    """

    def __init__(self, scheduler, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.configuration_utils import FrozenDict

        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise InputError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
        # FLUX's scheduler has use_dynamic_shifting: its own training schedule is then unshifted (σ = t / T on a linear
        # grid; the resolution-dependent shift μ is applied only by set_timesteps, at sampling), and diffusers'
        # train_dreambooth_lora_flux.py draws its training timesteps from that unshifted schedule, as this does.
        # A fresh copy: the pipeline's scheduler holds the timesteps of its last sampling run, not the training ones.
        fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.timesteps = fresh.timesteps.float()
        self._uniform_ranges: dict[int, tuple[float, float]] = {}
        self.config = FrozenDict({**fresh.config, "prediction_type": FLOW_MATCHING, "weighting_scheme": weighting_scheme,
                                  "logit_mean": logit_mean, "logit_std": logit_std, "mode_scale": mode_scale})

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.config.num_train_timesteps

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas(timesteps).to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        return (1.0 - sigma) * latents + sigma * noise

    def _timesteps_at(self, u: torch.Tensor) -> torch.Tensor:
        """The training timesteps at density values u ∈ [0, 1] (diffusers: ``timesteps[(u · T).long()]``)."""
        T = self.config.num_train_timesteps
        return self.timesteps[(u.cpu() * T).long().clamp(0, T - 1)]  # "mode" can give u = 1 exactly

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, min_timestep: int = 0) -> torch.Tensor:
        """n timesteps drawn as diffusers' SD3 script draws them; with ``min_timestep``, drawn from the same density
        restricted to the timesteps ≥ it (``uniform_range``)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        c = self.config
        device = generator.device if generator is not None else "cpu"
        if min_timestep:
            uniform = self._within(torch.rand(n, generator=generator, device=device), min_timestep)
            return self._timesteps_at(self.density_quantile(uniform.cpu()))
        u = compute_density_for_timestep_sampling(c.weighting_scheme, n, logit_mean=c.logit_mean, logit_std=c.logit_std,
                                                  mode_scale=c.mode_scale, generator=generator, device=device)
        return self._timesteps_at(u)

    def uniform_range(self, min_timestep: int) -> tuple[float, float]:
        """The interval of the uniform draw (``density_quantile``'s argument) whose timesteps are ≥ ``min_timestep``:
        drawing uniformly inside it draws from the density restricted to those timesteps. The timestep is monotone
        in the draw for every scheme, so the interval is read off a fine grid."""
        if min_timestep in self._uniform_ranges:  # asked at every training step
            return self._uniform_ranges[min_timestep]
        grid = (torch.arange(FLOW_RANGE_GRID, dtype=torch.float64) + 0.5) / FLOW_RANGE_GRID
        kept = (self._timesteps_at(self.density_quantile(grid)) >= min_timestep).nonzero().squeeze(1)
        if len(kept) == 0:
            raise InputError(f"no training timestep of this scheduler is ≥ `forget_min_timestep` {min_timestep}")
        # The kept grid points themselves (not half a grid step past them, which can reach the next timestep down).
        self._uniform_ranges[min_timestep] = float(grid[kept[0]]), float(grid[kept[-1]])
        return self._uniform_ranges[min_timestep]

    def _within(self, uniform: torch.Tensor, min_timestep: int) -> torch.Tensor:
        """Uniform draws in [0, 1) moved into ``uniform_range(min_timestep)``."""
        low, high = self.uniform_range(min_timestep)
        return low + (high - low) * uniform

    def density_quantile(self, uniform: torch.Tensor) -> torch.Tensor:
        """u of ``compute_density_for_timestep_sampling`` as a function of a uniform draw (its inverse CDF for
        logit_normal; its own transform of the uniform draw for mode; the draw itself otherwise)."""
        c = self.config
        if c.weighting_scheme == "logit_normal":
            return torch.sigmoid(c.logit_mean + c.logit_std * math.sqrt(2) * torch.erfinv(2 * uniform - 1))
        if c.weighting_scheme == "mode":
            return 1 - uniform - c.mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
        return uniform

    def stratified_timesteps(self, rows: int, num_bins: int, generator: torch.Generator,
                             min_timestep: int = 0) -> torch.Tensor:
        """[rows, K] timesteps, timestep j of each row from the j-th of K equal-probability bins of the density
        (restricted to the timesteps ≥ ``min_timestep``)."""
        uniform = (torch.arange(num_bins) + torch.rand(rows, num_bins, generator=generator)) / num_bins
        if min_timestep:
            uniform = self._within(uniform, min_timestep)
        return self._timesteps_at(self.density_quantile(uniform))

    def grid_timesteps(self) -> torch.Tensor:
        """T timesteps at the midpoints of T equal-probability bins: the reference Fisher's "all T timesteps"."""
        T = self.config.num_train_timesteps
        return self._timesteps_at(self.density_quantile((torch.arange(T) + 0.5) / T))

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.config.weighting_scheme, self.sigmas(timesteps))


def is_flow_matching(scheduler) -> bool:
    return getattr(scheduler.config, "prediction_type", None) == FLOW_MATCHING


def noise_scheduler_for(scheduler, **flow_matching):
    """The scheduler that noises training samples: DDPM with ``scheduler``'s config, or ``FlowMatchingNoise`` for a
    flow-matching pipeline (``flow_matching``: its ``weighting_scheme``, ``logit_mean``, ``logit_std``, ``mode_scale``).

    Pipelines ship inference schedulers: ``add_noise`` of SDXL's ``EulerDiscreteScheduler`` returns
    x₀ + σ·ε (the UNet expects √ᾱ·x₀ + √(1−ᾱ)·ε) and indexes the inference timesteps, and PNDM has no
    ``get_velocity``. Training and the Fisher therefore noise with DDPM built from the same betas and
    ``prediction_type``, as diffusers' training scripts do; for DDPM/DDIM configs nothing changes.
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchingNoise):
        return scheduler
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchingNoise(scheduler, **flow_matching)
    if type(scheduler) is DDPMScheduler:
        return scheduler
    return DDPMScheduler.from_config(scheduler.config)


def sample_timesteps(scheduler, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """One training timestep per sample: uniform integers for DDPM, the SD3 density for flow matching."""
    if is_flow_matching(scheduler):
        return scheduler.sample_timesteps(n, generator).to(device)
    T = scheduler.config.num_train_timesteps
    return torch.randint(0, T, (n,), generator=generator, device=generator.device if generator else None).to(device)


def noisiest_timesteps(scheduler, timesteps: torch.Tensor, min_timestep: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Training timesteps restricted to [``min_timestep``, T). DDPM: the uniform draws from [0, T) moved there by
    t ↦ min + ⌊t·(T − min) / T⌋ (uniform there too, and the same random draws as the unrestricted ones, so nothing
    else in a run shifts). Flow matching: drawn anew from ``generator``, from the σ density restricted to those
    timesteps (``FlowMatchingNoise.sample_timesteps``)."""
    if min_timestep == 0:
        return timesteps
    T = scheduler.config.num_train_timesteps
    if not 0 <= min_timestep < T:
        raise InputError(f"`forget_min_timestep` must be in [0, {T}) (the scheduler's num_train_timesteps), got {min_timestep}")
    if is_flow_matching(scheduler):
        return scheduler.sample_timesteps(len(timesteps), generator, min_timestep=min_timestep).to(timesteps.device)
    return min_timestep + (timesteps * (T - min_timestep)) // T


def model_prediction(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
    """The denoiser's output: ``timestep`` by keyword, which a UNet (``sample, timestep, …``) and an SD3 transformer
    (``hidden_states, encoder_hidden_states, pooled_projections, timestep, …``) both accept; FLUX's conditioning
    (its ``txt_ids``) goes through ``flux_prediction``. Latents stay [B, C, h, w] outside it, so the noise, the
    targets and the loss are the same code for every family."""
    if "txt_ids" in model_kwargs:  # the kwargs, not the model's class: a DDP- or compile-wrapped FLUX model is FLUX too
        return flux_prediction(model, noisy, timesteps, model_kwargs)
    return model(noisy, timestep=timesteps, **model_kwargs, return_dict=False)[0]


def flux_prediction(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
    """A FLUX transformer's velocity for [B, 16, h, w] latents, as diffusers' FLUX LoRA script calls it: the noisy
    latents packed into (h/2)(w/2) tokens of 2×2 patches with the pipeline's image ids (0, row, column), the timestep
    divided by 1000 (the transformer multiplies it back), and the output unpacked to [B, 16, h, w]."""
    from diffusers import FluxPipeline

    batch, channels, height, width = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
    out = model(hidden_states=packed, timestep=timesteps / 1000, img_ids=img_ids, **model_kwargs, return_dict=False)[0]
    # _unpack_latents takes the image size in pixels and the VAE factor: the latent size with a factor of 1.
    return FluxPipeline._unpack_latents(out, height, width, 1)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """ε for epsilon-prediction schedulers, v = α·ε − σ·x₀ for v-prediction (SD 2.x), ε − x₀ for flow matching."""
    kind = scheduler.config.prediction_type
    if kind == FLOW_MATCHING:
        return noise - latents
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise InputError(f"unsupported prediction_type {kind!r}; expected 'epsilon' or 'v_prediction'")


def per_sample_diffusion_loss(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    unet_kwargs: dict,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the model's prediction and its target, averaged over latent elements: one value per sample
    (for flow matching times the SD3 loss weight of its σ, as diffusers weights it).

    ``target`` replaces the usual ε / v target (replay distillation passes the frozen model's prediction)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model_prediction(unet, noisy, timesteps, unet_kwargs)
    if target is None:
        target = prediction_target(scheduler, latents, noise, timesteps)
    losses = (prediction.float() - target.float()).square().flatten(1).mean(1)
    if is_flow_matching(scheduler):
        losses = losses * scheduler.loss_weights(timesteps).to(losses)
    return losses


def snr_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), as diffusers' training scripts apply them."""
    from diffusers.training_utils import compute_snr

    if is_flow_matching(scheduler):
        raise InputError("`snr_gamma` (Min-SNR weighting) is for DDPM-trained UNets; flow-matching models (SD3, FLUX) weight "
                         "the loss by `weighting_scheme` instead: drop `snr_gamma`")
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=snr_gamma) / (snr + 1)
    return weights
