"""Diagonal empirical Fisher information of base UNet weights: estimation, storage and checked loading.

F_i = mean over samples n of g_{n,i}², where g_n is the gradient of sample n's own diffusion loss
(per-sample gradients, never a squared batch gradient), on samples the frozen model generated,
each paired with its own prompt.

Estimators:
- ``reference``: as the official Selective Amnesia code, g_n = ∇ Σ_{t=0}^{T-1} ℓ_t(x_n) with a fresh
  noise draw per timestep (T UNet passes per sample).
- ``fast``: K stratified timesteps per sample (one uniform draw in each of K equal bins), with the sum
  rescaled by T/K so that its expectation is the reference sum (K passes per sample).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from .conditioning import PromptConditioning
from .diffusion_loss import is_flow_matching, per_sample_diffusion_loss
from .errors import InputError, MissingInputError
from .io_utils import atomic_path
from .safetensors_header import read_safetensors_header

FISHER_FORMAT = "sa-peft-fisher/1"
ESTIMATORS = ("reference", "fast")


@dataclass
class FisherInfo:
    """A diagonal Fisher over named base weights (``<module>.weight``), in full and factored form.

    ``diagonal`` may be empty for a factored-only file; ``row_sums``/``col_sums`` are the marginals
    of each weight's Fisher flattened to m×(n·k·k), which is all the low-rank penalty needs.
    """

    row_sums: dict[str, torch.Tensor]
    col_sums: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    diagonal: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # μ, the mean over samples of the per-sample gradient g_n, per weight: the direction of the rank-1
    # Fisher penalty (ewc.Rank1FisherPenalty). Empty for files written before it existed.
    mean_gradient: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(k[: -len(".weight")] for k in self.shapes)

    @classmethod
    def from_diagonal(cls, diagonal: dict[str, torch.Tensor], metadata: dict[str, str],
                      mean_gradient: dict[str, torch.Tensor] | None = None) -> FisherInfo:
        flat = {k: v.reshape(v.shape[0], -1) for k, v in diagonal.items()}
        return cls(
            row_sums={k: v.sum(1) for k, v in flat.items()},
            col_sums={k: v.sum(0) for k, v in flat.items()},
            shapes={k: tuple(v.shape) for k, v in diagonal.items()},
            diagonal=dict(diagonal),
            metadata=dict(metadata),
            mean_gradient=dict(mean_gradient or {}),
        )


def base_weights_hash(unet: torch.nn.Module, module_names: Sequence[str]) -> str:
    """SHA-256 over the float32 bytes of the named modules' base weights, in sorted order."""
    modules = dict(unet.named_modules())
    digest = hashlib.sha256()
    for name in sorted(module_names):
        module = modules.get(name)  # peft registers its LoRA wrapper under the base module's own name
        if module is None:
            raise InputError(f"module {name!r} is not in the UNet")
        weight = module.base_layer.weight if hasattr(module, "base_layer") else module.weight
        digest.update(name.encode())
        digest.update(weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def prompts_hash(prompts: Sequence[str]) -> str:
    """A short, order-sensitive hash of the prompts the Fisher samples were paired with."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


def fisher_timesteps(estimator: str, num_train_timesteps: int, num_timesteps: int, generator: torch.Generator,
                     scheduler=None) -> torch.Tensor:
    """Timesteps one sample's gradient is summed over, and implicitly the weight T/K applied to the sum.

    For a flow-matching ``scheduler`` (``diffusion_loss.FlowMatchingNoise``) the bins are equal-probability bins
    of its σ density instead of equal ranges of integer timesteps, and "all T" is one timestep per bin of T."""
    flow = scheduler is not None and is_flow_matching(scheduler)
    if estimator == "reference":
        return scheduler.grid_timesteps() if flow else torch.arange(num_train_timesteps)
    if estimator == "fast":
        if not 0 < num_timesteps <= num_train_timesteps:
            raise InputError(f"`fisher_num_timesteps` must be in 1..{num_train_timesteps}, got {num_timesteps}")
        if flow:
            return scheduler.stratified_timesteps(1, num_timesteps, generator)[0]
        edges = torch.linspace(0, num_train_timesteps, num_timesteps + 1)
        offsets = torch.rand(num_timesteps, generator=generator)
        return (edges[:-1] + offsets * (edges[1:] - edges[:-1])).long().clamp(max=num_train_timesteps - 1)
    raise InputError(f"`fisher_estimator` must be one of {ESTIMATORS}, got {estimator!r}")


def estimate_fisher(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    prompt_ids: torch.Tensor,
    conditioning: PromptConditioning,
    module_names: Sequence[str],
    estimator: str = "fast",
    num_timesteps: int = 8,
    timestep_batch_size: int = 64,
    seed: int = 0,
    accelerator=None,
    show_progress: bool = True,
) -> FisherInfo:
    """Estimate the diagonal Fisher of ``module_names``' weights from per-sample gradients.

    ``latents[n]`` (scaled VAE latents of a frozen-model sample) is paired with prompt
    ``conditioning.prompts[prompt_ids[n]]``. Under ``accelerator`` the samples are sharded over
    processes (sample n on process n mod world size) and the sums reduced, so the result does not
    depend on the number of processes. Noise and timesteps of sample n come from seed ``seed + n``.
    """
    if len(latents) == 0:
        raise InputError("no samples to estimate the Fisher from; raise `fisher_num_samples`")
    if len(prompt_ids) != len(latents):
        raise ValueError("latents and prompt_ids differ in length")
    modules = dict(unet.named_modules())
    unknown = [n for n in module_names if n not in modules or not hasattr(modules[n], "weight")]
    if unknown:
        raise ValueError(f"unknown UNet modules for the Fisher: {unknown[:5]}")
    params = [modules[n].weight for n in module_names]
    device = params[0].device
    dtype = params[0].dtype
    was_training = unet.training
    old_requires_grad = {id(p): p.requires_grad for p in unet.parameters()}
    unet.eval()
    unet.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    indices = list(range(rank, len(latents), world))
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    grad_sums = [torch.zeros_like(s) for s in sums]
    T = scheduler.config.num_train_timesteps
    try:
        for n in tqdm(indices, desc=f"Fisher ({estimator})", disable=not show_progress):
            generator = torch.Generator().manual_seed(seed + n)
            timesteps = fisher_timesteps(estimator, T, num_timesteps, generator, scheduler)
            weight = 1.0 if estimator == "reference" else T / len(timesteps)
            grads = [torch.zeros_like(s) for s in sums]
            for chunk in timesteps.split(timestep_batch_size):
                x0 = latents[n : n + 1].to(device, dtype).expand(len(chunk), *latents.shape[1:])
                noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
                kwargs = conditioning.unet_kwargs(prompt_ids[n : n + 1].repeat(len(chunk)), dtype)
                loss = per_sample_diffusion_loss(unet, scheduler, x0, chunk.to(device), noise, kwargs).sum()
                for g, d in zip(grads, torch.autograd.grad(loss, params)):
                    g += d.float()
            for s, m, g in zip(sums, grad_sums, grads):
                s += (weight * g).square()
                m += weight * g
    finally:
        for p in unet.parameters():
            p.requires_grad_(old_requires_grad[id(p)])
        unet.train(was_training)

    if accelerator is not None and world > 1:
        flat = accelerator.reduce(torch.cat([s.flatten() for s in sums + grad_sums]), reduction="sum")
        flat = [f.view(p.shape) for f, p in zip(flat.split([s.numel() for s in sums + grad_sums]), params + params)]
        sums, grad_sums = flat[: len(sums)], flat[len(sums) :]
    diagonal = {f"{name}.weight": (s / len(latents)).cpu() for name, s in zip(module_names, sums)}
    mean_gradient = {f"{name}.weight": (m / len(latents)).cpu() for name, m in zip(module_names, grad_sums)}
    metadata = {
        "format": FISHER_FORMAT,
        "base_weights_hash": base_weights_hash(unet, module_names),
        "modules": json.dumps(list(module_names)),
        "prompts_hash": prompts_hash([conditioning.prompts[i] for i in prompt_ids.tolist()]),
        "num_samples": str(len(latents)),
        "estimator": estimator,
        "num_timesteps": str(T if estimator == "reference" else num_timesteps),
        "num_train_timesteps": str(T),
        "unet_passes": str(len(latents) * (T if estimator == "reference" else num_timesteps)),
        "loss_normalization": (
            "per-sample loss = mean over latent elements of the squared prediction error, summed over "
            + ("all T timesteps" if estimator == "reference" else "K stratified timesteps and scaled by T/K")
            + "; F = mean over samples of the squared per-sample gradient"
        ),
        "prediction_type": scheduler.config.prediction_type,
        **({"weighting_scheme": scheduler.config.weighting_scheme} if is_flow_matching(scheduler) else {}),
        "dtype": "float32",
        "model_dtype": str(dtype).replace("torch.", ""),
        "seed": str(seed),
        "sa_peft_version": __version__,
    }
    return FisherInfo.from_diagonal(diagonal, metadata, mean_gradient)


def save_fisher(fisher: FisherInfo, path: str | os.PathLike, factored_only: bool = False) -> None:
    """Write a Fisher to a safetensors file atomically: ``diag/<weight>`` and ``rows/``, ``cols/`` factors."""
    tensors = {}
    for key in fisher.shapes:
        if not factored_only:
            if key not in fisher.diagonal:
                raise InputError(f"{key}: this Fisher is factored-only; save it with factored_only=True")
            tensors[f"diag/{key}"] = fisher.diagonal[key].contiguous()
        tensors[f"rows/{key}"] = fisher.row_sums[key].contiguous()
        tensors[f"cols/{key}"] = fisher.col_sums[key].contiguous()
        if key in fisher.mean_gradient and not factored_only:
            tensors[f"mean/{key}"] = fisher.mean_gradient[key].contiguous()
    metadata = dict(fisher.metadata)
    metadata["format"] = FISHER_FORMAT  # what is written is this format, whatever the metadata says
    metadata["shapes"] = json.dumps({k: list(v) for k, v in fisher.shapes.items()})
    metadata["factored_only"] = str(factored_only).lower()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


# Metadata keys a reused Fisher must match, with the flag that sets each.
FISHER_SETTING_PARAMETERS = {"estimator": "`fisher_estimator`", "num_timesteps": "`fisher_num_timesteps`",
                             "num_samples": "`fisher_num_samples`", "seed": "`seed`", "prompts_hash": "the replay prompts",
                             "weighting_scheme": "`weighting_scheme`"}


def check_fisher_settings(fisher: FisherInfo, path: str | os.PathLike, expected: dict[str, str]) -> None:
    """Refuse a Fisher file made with other estimator settings than ``expected`` (metadata key → value).

    Before, a ``--fisher_path`` made with e.g. ``--fisher_estimator reference`` was reused by a run asking
    for ``fast``, and the card claimed ``fast``.
    """
    differ = [f"{FISHER_SETTING_PARAMETERS.get(k, k)}: file {fisher.metadata.get(k)!r}, this run {v!r}"
              for k, v in expected.items() if fisher.metadata.get(k) != v]
    if differ:
        raise InputError(f"`fisher_path` {os.fspath(path)!r} was made with other settings ({'; '.join(differ)}); "
                         "delete the file, pass a new `fisher_path`, or run with the file's settings")


def load_fisher(
    path: str | os.PathLike,
    unet: torch.nn.Module | None = None,
    required_modules: Sequence[str] | None = None,
) -> FisherInfo:
    """Load a Fisher file; with ``unet``/``required_modules`` check it belongs to that base model and covers them."""
    path = str(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"`fisher_path` {path!r} does not exist")
    if not path.endswith(".safetensors"):
        raise InputError(f"`fisher_path` {path!r}: Fisher files are read only from .safetensors files")
    metadata = read_safetensors_header(path, "fisher_path")
    if metadata.get("format") != FISHER_FORMAT:
        raise InputError(f"`fisher_path` {path!r} is not an sa-peft Fisher file (format {metadata.get('format')!r})")
    shapes = {k: tuple(v) for k, v in json.loads(metadata.pop("shapes")).items()}
    factored_only = metadata.pop("factored_only", "false") == "true"
    with safe_open(path, framework="pt") as f:
        rows = {k: f.get_tensor(f"rows/{k}") for k in shapes}
        cols = {k: f.get_tensor(f"cols/{k}") for k in shapes}
        diagonal = {} if factored_only else {k: f.get_tensor(f"diag/{k}") for k in shapes}
        names = set(f.keys())
        mean_gradient = {k: f.get_tensor(f"mean/{k}") for k in shapes if f"mean/{k}" in names}
    fisher = FisherInfo(rows, cols, shapes, diagonal, metadata, mean_gradient)
    if required_modules is not None:
        missing = sorted(set(required_modules) - set(fisher.modules))
        if missing:
            raise InputError(
                f"`fisher_path` {path!r} does not cover {len(missing)} module(s) the LoRA adapts, e.g. "
                f"{missing[:3]}; recompute it for this `lora_target` (delete the file or pass a new `fisher_path`)"
            )
    if unet is not None:
        expected = base_weights_hash(unet, fisher.modules)
        if expected != metadata.get("base_weights_hash"):
            raise InputError(
                f"`fisher_path` {path!r} was computed for another base model (weights hash differs); "
                "recompute it for this `pretrained_model_name_or_path` (delete the file or pass a new `fisher_path`)"
            )
    return fisher



