"""Surrogate and replay sets: generated once by the frozen pipeline, stored as latents.

A set is a folder in the image-folder convention:
    settings.json                       what the set is (checked on resume)
    latents-00000.safetensors, ...      scaled VAE latents, SHARD_SIZE images each, rows in the header
    images/00000.png, ...               previews
    metadata.jsonl                      file_name, prompt, seed, kind (and source) per image; written last
Each image i uses its own seed ``seed + i``, so a set is the same whatever the batch size, the number of
processes or how often the run was interrupted; existing shards are kept and missing ones generated.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import InputError, MissingInputError
from .io_utils import atomic_path, write_json_atomic, write_text_atomic
from .models import ddim_sampling, denoiser, is_flux
from .prompts import check_prompts

SHARD_SIZE = 16
SURROGATE_TYPES = ("uniform_noise", "gaussian_noise")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ImageSet:
    """Latents and the prompt each one is paired with for training."""

    latents: torch.Tensor  # [N, C, h, w], scaled as the UNet sees them
    prompts: list[str]
    rows: list[dict]

    def prompt_ids(self, prompt_order: Sequence[str]) -> torch.Tensor:
        """Index of each sample's prompt in ``prompt_order`` (e.g. ``PromptConditioning.prompts``)."""
        lookup = {p: i for i, p in enumerate(prompt_order)}
        return torch.tensor([lookup[p] for p in self.prompts], dtype=torch.long)


def check_resolution(pipe, resolution: int) -> int:
    """Reject sizes the pipeline cannot take: not a positive multiple of the VAE's downsampling factor
    (and of 8, which diffusers' Stable Diffusion pipelines require)."""
    # A transformer (SD3) also needs whole patches of latents: diffusers' SD3 pipeline refuses other sizes. FLUX packs
    # 2×2 latent patches (its pipeline would silently resize to a multiple of twice the VAE's factor).
    patch = 2 if is_flux(pipe) else getattr(pipe, "patch_size", 1)
    factor = math.lcm(8, pipe.vae_scale_factor * patch)
    if resolution <= 0 or resolution % factor:
        raise InputError(
            f"`resolution` {resolution} is not a positive multiple of {factor} (the VAE's downsampling "
            f"factor and 8); use e.g. {max(factor, round(max(resolution, 1) / factor) * factor)}"
        )
    return resolution


def default_resolution(pipe) -> int:
    """The pipeline's native image size (512 for SD 1.x, 768 for SD 2.x-v, 1024 for SDXL, SD3 and FLUX).

    FLUX's transformer has no ``sample_size``: its pipeline's default, ``default_sample_size`` (128) latents, is used."""
    if is_flux(pipe):
        return int(pipe.default_sample_size * pipe.vae_scale_factor)
    return int(denoiser(pipe).config.sample_size * pipe.vae_scale_factor)


def _vae_shift(vae) -> float:
    """SD3's and FLUX's VAE latents are (z − shift_factor) · scaling_factor; SD 1.x/2.x/SDXL have no shift."""
    return vae.config.get("shift_factor") or 0.0


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (as the denoiser sees them) → images ``[N, C, H, W]`` in [0, 1], float32."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + _vae_shift(vae)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _decode_to_pil(pipe, latents: torch.Tensor) -> list[Image.Image]:
    images = decode_latents(pipe, latents).permute(0, 2, 3, 1).cpu().numpy()
    arrays = (images * 255).round().astype(np.uint8)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def _encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → scaled latents (the posterior mean, so encoding is deterministic)."""
    vae = pipe.vae
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return (posterior.mean - _vae_shift(vae)) * vae.config.scaling_factor


def _load_image(path: str, resolution: int, channels: int) -> torch.Tensor:
    try:
        image = Image.open(path).convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise InputError(f"`surrogate_data_dir`: cannot read the image {path!r} ({err}); replace or remove it") from None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1)


def _latents_for_rows(pipe, rows: list[dict], resolution: int, guidance_scale: float, num_inference_steps: int) -> torch.Tensor:
    kind = rows[0]["kind"]
    channels = pipe.vae.config.in_channels
    if kind in ("prompt", "replay"):
        generators = [torch.Generator().manual_seed(r["seed"]) for r in rows]
        latents = pipe(
            [r["source"] for r in rows],
            height=resolution,
            width=resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="latent",
        ).images
        # FLUX returns its latents packed ([N, tokens, 64]); sets hold [N, 16, h, w] like every other family's.
        return pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor) if is_flux(pipe) else latents
    if kind == "images":
        images = torch.stack([_load_image(r["source"], resolution, channels) for r in rows])
    elif kind in SURROGATE_TYPES:
        shape = (channels, resolution, resolution)
        noise = []
        for r in rows:
            g = torch.Generator().manual_seed(r["seed"])
            if kind == "uniform_noise":
                noise.append(torch.rand(shape, generator=g) * 2 - 1)
            else:
                noise.append((torch.randn(shape, generator=g) * 0.5).clamp(-1, 1))
        images = torch.stack(noise)
    else:
        raise ValueError(f"unknown image-set kind {kind!r}")
    return _encode_images(pipe, images)


def _build_set(pipe, output_dir: str, rows: list[dict], settings: dict, resolution: int, guidance_scale: float,
               num_inference_steps: int, accelerator, show_progress: bool, desc: str) -> ImageSet:
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    settings_path = os.path.join(output_dir, "settings.json")
    is_main = accelerator is None or accelerator.is_main_process
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            existing = json.load(f)
        if existing != json.loads(json.dumps(settings)):
            raise InputError(
                f"{output_dir!r} holds a set made with other settings; choose another folder or delete it"
            )
    elif is_main:
        write_json_atomic(settings_path, settings)
    shards = [rows[i : i + SHARD_SIZE] for i in range(0, len(rows), SHARD_SIZE)]
    present = [_shard_is_readable(_shard_path(output_dir, k)) for k in range(len(shards))]
    if os.path.exists(os.path.join(output_dir, "metadata.jsonl")) and all(present):
        return load_image_set(output_dir)

    # A shard deleted or cut short after the set was complete is generated again (each image has its own
    # seed, so the new shard equals the lost one); before, the run trained on the shards that were left.
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = [k for k in range(len(shards)) if k % world == rank]
    todo = [k for k in mine if not present[k]]
    with ddim_sampling(pipe):  # samples as the reference code makes them: DDIM, eta 0
        for k in tqdm(todo, desc=desc, disable=not show_progress or not todo, initial=len(mine) - len(todo), total=len(mine)):
            shard_rows = shards[k]
            with torch.no_grad():
                latents = _latents_for_rows(pipe, shard_rows, resolution, guidance_scale, num_inference_steps)
                for row, image in zip(shard_rows, _decode_to_pil(pipe, latents)):
                    with atomic_path(os.path.join(output_dir, row["file_name"])) as tmp:
                        image.save(tmp, format="PNG")
            # The shard is written last: its presence means the whole shard is done.
            with atomic_path(_shard_path(output_dir, k)) as tmp:
                save_file({"latents": latents.float().cpu().contiguous()}, tmp, metadata={"rows": json.dumps(shard_rows)})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main:
        lines = []
        for r in rows:
            entry = {"file_name": r["file_name"], "prompt": r["prompt"], "seed": r["seed"], "kind": r["kind"]}
            if r["source"] != r["prompt"]:
                entry["source"] = r["source"]
            lines.append(json.dumps(entry))
        write_text_atomic(os.path.join(output_dir, "metadata.jsonl"), "\n".join(lines) + "\n")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return load_image_set(output_dir)


def _shard_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"latents-{index:05d}.safetensors")


def _shard_is_readable(path: str) -> bool:
    """True when the shard exists and its header and rows can be read (a truncated file cannot)."""
    if not os.path.exists(path):
        return False
    try:
        with safe_open(path, framework="pt") as f:
            json.loads((f.metadata() or {})["rows"])
            f.get_slice("latents").get_shape()
    except Exception:  # noqa: BLE001 (any failure to read means: generate it again)
        return False
    return True


def _common_settings(pipe, resolution, guidance_scale, num_inference_steps, seed) -> dict:
    return {
        "resolution": resolution,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "shard_size": SHARD_SIZE,
        "latent_channels": pipe.vae.config.latent_channels,
    }


def _check_count(value: int, parameter: str) -> None:
    if value <= 0:
        raise InputError(f"`{parameter}` must be a positive integer, got {value}")


def generate_surrogate_set(
    pipe,
    output_dir: str | os.PathLike,
    forget_prompts: Sequence[str],
    num_images: int,
    surrogate_prompt: str | Sequence[str] | None = None,
    surrogate_data_dir: str | os.PathLike | None = None,
    surrogate_type: str | None = None,
    seed: int = 0,
    resolution: int | None = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    accelerator=None,
    show_progress: bool = True,
) -> ImageSet:
    """Build q(x | c_f): stand-in images paired with the forget prompt(s), round-robin.

    Exactly one source: ``surrogate_prompt`` (generated by the frozen pipeline; another concept's
    prompt works the same way; a list gives each forget prompt its own, paired in order), ``surrogate_data_dir`` (the user's own images) or ``surrogate_type``
    (``uniform_noise``/``gaussian_noise`` images in [-1, 1], encoded by the VAE).
    """
    forget_prompts = check_prompts(forget_prompts, "forget_prompt")
    _check_count(num_images, "num_surrogate_images")
    given = [x is not None for x in (surrogate_prompt, surrogate_data_dir, surrogate_type)]
    if sum(given) != 1:
        raise InputError(
            "give exactly one surrogate source: `surrogate_prompt`, `surrogate_data_dir` or `surrogate_type`"
        )
    resolution = check_resolution(pipe, default_resolution(pipe) if resolution is None else resolution)
    if surrogate_prompt is not None:
        # One surrogate for every forget prompt, or one each, paired in order (image i: forget prompt
        # i mod F with surrogate i mod F).
        sources = check_prompts([surrogate_prompt] if isinstance(surrogate_prompt, str) else list(surrogate_prompt), "surrogate_prompt")
        if len(sources) not in (1, len(forget_prompts)):
            raise InputError(f"{len(sources)} `surrogate_prompt` for {len(forget_prompts)} forget prompts: give one "
                             "surrogate for all of them, or one per forget prompt (paired in order)")
        kind = "prompt"
    elif surrogate_data_dir is not None:
        folder = os.path.abspath(os.fspath(surrogate_data_dir))
        if not os.path.isdir(folder):
            raise MissingInputError(f"`surrogate_data_dir` {folder!r} is not a folder")
        sources = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if p.lower().endswith(IMAGE_EXTENSIONS))
        if not sources:
            raise InputError(f"`surrogate_data_dir` {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        kind = "images"
    else:
        if surrogate_type == "noise":
            surrogate_type = "uniform_noise"
        if surrogate_type not in SURROGATE_TYPES:
            raise InputError(f"`surrogate_type` must be 'noise', {' or '.join(SURROGATE_TYPES)}; got {surrogate_type!r}")
        kind, sources = surrogate_type, [surrogate_type]
    rows = [
        {
            "file_name": f"images/{i:05d}.png",
            "prompt": forget_prompts[i % len(forget_prompts)],
            "source": sources[i % len(sources)],
            "seed": seed + i,
            "kind": kind,
        }
        for i in range(num_images)
    ]
    settings = {"set": "surrogate", "kind": kind, "forget_prompts": forget_prompts, "sources": sources,
                "num_images": num_images, **_common_settings(pipe, resolution, guidance_scale, num_inference_steps, seed)}
    return _build_set(pipe, os.fspath(output_dir), rows, settings, resolution, guidance_scale, num_inference_steps,
                      accelerator, show_progress, "surrogate set")


def generate_replay_set(
    pipe,
    output_dir: str | os.PathLike,
    prompts: Sequence[str],
    num_images_per_prompt: int,
    seed: int = 0,
    resolution: int | None = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    accelerator=None,
    show_progress: bool = True,
) -> ImageSet:
    """Build the replay set: the frozen pipeline's own samples of the concepts to keep, with their prompts."""
    prompts = check_prompts(prompts, "replay_prompts_file")
    _check_count(num_images_per_prompt, "num_replay_images_per_prompt")
    resolution = check_resolution(pipe, default_resolution(pipe) if resolution is None else resolution)
    rows = []
    for j in range(num_images_per_prompt):
        for prompt in prompts:  # prompt-major inner loop: any prefix of the set covers every prompt
            i = len(rows)
            rows.append({"file_name": f"images/{i:05d}.png", "prompt": prompt, "source": prompt, "seed": seed + i, "kind": "replay"})
    settings = {"set": "replay", "prompts": prompts, "num_images_per_prompt": num_images_per_prompt,
                **_common_settings(pipe, resolution, guidance_scale, num_inference_steps, seed)}
    return _build_set(pipe, os.fspath(output_dir), rows, settings, resolution, guidance_scale, num_inference_steps,
                      accelerator, show_progress, "replay set")


def load_image_set(folder: str | os.PathLike) -> ImageSet:
    """Load a complete set written by ``generate_surrogate_set``/``generate_replay_set``."""
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        raise MissingInputError(f"{folder!r} is not a complete sa-peft image set (no metadata.jsonl)")
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        expected = sum(1 for line in f if line.strip())
    latents, rows = [], []
    for path in sorted(glob.glob(os.path.join(folder, "latents-*.safetensors"))):
        try:
            with safe_open(path, framework="pt") as f:
                latents.append(f.get_tensor("latents"))
                rows.extend(json.loads(f.metadata()["rows"]))
        except Exception as err:  # noqa: BLE001 (a truncated or foreign file: name it)
            raise InputError(f"image set {folder!r}: the shard {os.path.basename(path)!r} cannot be read ({err}); "
                             "delete it and rerun the command that made the set to generate it again") from None
    if not latents:
        raise MissingInputError(f"{folder!r} has no latents shards")
    if len(rows) != expected:
        raise InputError(f"image set {folder!r} holds {len(rows)} images in its shards but its metadata.jsonl lists "
                         f"{expected}: a shard is missing; rerun the command that made the set to generate it again")
    return ImageSet(torch.cat(latents), [r["prompt"] for r in rows], rows)
