"""The cached phases of a forget run, shared by the training script and the ``sa-peft`` subcommands.

Each phase's output is cached under a name keyed by everything that determines it (``settings_key``),
so a rerun after a crash reuses what is done and a changed setting never reuses stale samples:

1. ``build_training_sets``: the surrogate and replay sets, sampled once by the frozen model, their prompts
   encoded, the held-out sets of the forgetting signal and, for ``--robust_forgetting``, the concept set;
2. ``load_or_estimate_fisher``: the Fisher of the adapted weights on the frozen model's replay samples.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

from .conditioning import PromptConditioning, encode_prompts
from .data import ImageSet, generate_replay_set, generate_surrogate_set
from .diffusion_loss import is_flow_matching
from .errors import InputError
from .fisher import FisherInfo, check_fisher_settings, estimate_fisher, load_fisher, prompts_hash, save_fisher
from .forgetting import ForgettingProbe
from .run_lock import file_lock
from .training_setup import settings_key


@dataclass
class TrainingSets:
    """What ``build_training_sets`` returns: the sets, the encoded prompts and the held-out probe."""

    surrogate: ImageSet
    replay: ImageSet
    conditioning: PromptConditioning  # forget + replay + surrogate prompts, in that order
    probe: ForgettingProbe
    replay_settings: dict  # the replay set's cache key (the Fisher's cache key includes it)
    num_replay_images_per_prompt: int  # as generated: enough for the Fisher's samples too
    robust_concepts: ImageSet | None = None  # --robust_forgetting's concept-ablation images (``robust_concept_set``)
    attack_check: ImageSet | None = None  # --robust_forgetting's held-out concept images for the attack check


def generation_settings(config, resolution: int, model_key: str) -> dict:
    """The sampling settings every generated set's cache key starts with."""
    return {"resolution": resolution, "guidance": config.generation_guidance_scale,
            "steps": config.generation_num_inference_steps, "seed": config.seed, "model": model_key}


def surrogate_settings(config, generation: dict) -> dict:
    return {**generation, "forget": config.forget_prompts, "surrogate": config.surrogate_description(),
            "n": config.num_surrogate_images,
            **({"data_dir": os.path.abspath(config.surrogate_data_dir)} if config.surrogate_data_dir else {})}


def build_training_sets(pipe, config, resolution: int, model_key: str, scheduler, accelerator=None,
                        show_progress: bool = True) -> TrainingSets:
    """Phase 1: the surrogate and replay sets (cached in ``config.output_dir/cache``), their prompts encoded
    once, and the forgetting signal's held-out sets (``build_forgetting_probe``)."""
    cache = os.path.join(config.output_dir, "cache")
    common = {"resolution": resolution, "guidance_scale": config.generation_guidance_scale,
              "num_inference_steps": config.generation_num_inference_steps, "accelerator": accelerator,
              "show_progress": show_progress}
    generation = generation_settings(config, resolution, model_key)
    sur_settings = surrogate_settings(config, generation)
    surrogate = generate_surrogate_set(
        pipe, os.path.join(cache, f"surrogate-{settings_key(sur_settings)}"), config.forget_prompts,
        config.num_surrogate_images, surrogate_prompt=config.surrogate_prompt,
        surrogate_data_dir=config.surrogate_data_dir, surrogate_type=config.surrogate_type, seed=config.seed, **common,
    )
    # The Fisher is estimated on the replay set's samples, as in the reference code, so the set holds enough for both.
    replay_prompts = config.replay_prompts
    per_prompt = max(config.num_replay_images_per_prompt, math.ceil(config.fisher_num_samples / len(replay_prompts)))
    rep_settings = {**generation, "prompts": replay_prompts, "per_prompt": per_prompt}
    replay = generate_replay_set(pipe, os.path.join(cache, f"replay-{settings_key(rep_settings)}"), replay_prompts,
                                 per_prompt, seed=config.seed + 1_000_000, **common)
    # The surrogate prompts too: the forgetting signal measures the held-out images under them.
    # A guidance-distilled FLUX transformer is trained, distilled and measured at the guidance its sets were sampled
    # with (the replay targets are the frozen model's predictions there).
    conditioning = encode_prompts(pipe, config.forget_prompts + replay_prompts + (config.surrogate_prompt or []),
                                  resolution, guidance_scale=config.generation_guidance_scale)
    probe = build_forgetting_probe(pipe, config, generation, sur_settings, conditioning, scheduler, common)
    return TrainingSets(surrogate, replay, conditioning, probe, rep_settings, per_prompt,
                        robust_concept_set(pipe, config, generation, common),
                        attack_check_set(pipe, config, generation, common))


def robust_concept_set(pipe, config, generation: dict, common: dict) -> ImageSet | None:
    """``--robust_forgetting`` with a surrogate prompt: the frozen model's own images of each forget prompt (new
    seeds: neither the probe's held-out images nor any other set), which the concept-ablation term trains away
    (``sa_peft.robust``). ``None`` otherwise: without a surrogate prompt there is no prediction to ablate towards."""
    if not config.robust_forgetting or None in config.paired_surrogate_prompts():
        return None
    return _robust_images(pipe, config, generation, common, "concept", "robust-concept", config.seed + 8_000_000)


def attack_check_set(pipe, config, generation: dict, common: dict) -> ImageSet | None:
    """``--robust_forgetting``: the frozen model's own images of each forget prompt that the check choosing the shipped
    state fits its attack on (``sa_peft.robust.LeastAttackedState``), as many as ``sa-peft attack`` fits on, with
    seeds of their own: neither trained on nor the probe's. ``None`` without the flag."""
    if not config.robust_forgetting:
        return None
    return _robust_images(pipe, config, generation, common, "attack check", "attack-check", config.seed + 9_000_000)


def _robust_images(pipe, config, generation: dict, common: dict, role: str, prefix: str, seed: int) -> ImageSet:
    """``ABLATION_IMAGES_PER_PROMPT`` frozen-model images of each forget prompt from ``seed`` on, cached as ``prefix-*``."""
    from .robust import ABLATION_IMAGES_PER_PROMPT  # here: robust.py imports the attacks package and its classifiers

    n = ABLATION_IMAGES_PER_PROMPT
    settings = {**generation, "prompts": config.forget_prompts, "per_prompt": n, "robust": role}
    return generate_replay_set(pipe, os.path.join(config.output_dir, "cache", f"{prefix}-{settings_key(settings)}"),
                               config.forget_prompts, n, seed=seed, **common)


def build_forgetting_probe(pipe, config, generation: dict, sur_settings: dict, conditioning: PromptConditioning,
                           scheduler, common: dict) -> ForgettingProbe:
    """Held-out sets for the forgetting signal: the frozen model's own images of each forget prompt, as
    many surrogate images per forget prompt, and a few replay images per replay prompt (new seeds, so
    none of them is trained on). ``common``: the sampling keywords of ``generate_replay_set``."""
    n, forget, replay = config.num_probe_images, config.forget_prompts, config.replay_prompts
    cache = os.path.join(config.output_dir, "cache")
    concept_settings = {**generation, "prompts": forget, "per_prompt": n, "probe": "concept"}
    concepts = generate_replay_set(pipe, os.path.join(cache, f"probe-concept-{settings_key(concept_settings)}"), forget,
                                   n, seed=config.seed + 2_000_000, **common)
    probe_sur_settings = {**sur_settings, "n": n * len(forget), "probe": "surrogate"}
    surrogates = generate_surrogate_set(
        pipe, os.path.join(cache, f"probe-surrogate-{settings_key(probe_sur_settings)}"), forget, n * len(forget),
        surrogate_prompt=config.surrogate_prompt, surrogate_data_dir=config.surrogate_data_dir,
        surrogate_type=config.surrogate_type, seed=config.seed + 3_000_000, **common,
    )
    per_prompt = max(1, math.ceil(2 * n / len(replay)))
    replay_settings = {**generation, "prompts": replay, "per_prompt": per_prompt, "probe": "replay"}
    replays = generate_replay_set(pipe, os.path.join(cache, f"probe-replay-{settings_key(replay_settings)}"), replay,
                                  per_prompt, seed=config.seed + 4_000_000, **common)

    def of_prompt(image_set, prompt):
        return image_set.latents[[i for i, p in enumerate(image_set.prompts) if p == prompt]]

    return ForgettingProbe(
        conditioning, forget, [of_prompt(concepts, f) for f in forget], [of_prompt(surrogates, f) for f in forget],
        replays.latents, replays.prompt_ids(conditioning.prompts), scheduler.config.num_train_timesteps,
        seed=config.seed, threshold=config.forgetting_threshold, retention_bound=config.retention_bound,
        surrogate_prompts=config.paired_surrogate_prompts(), noise_scheduler=scheduler,
        forget_min_timestep=config.forget_min_timestep or 0,
    )


def fisher_num_timesteps(estimator: str, num_timesteps: int, scheduler) -> int:
    """The timesteps per sample a Fisher is estimated on: all T for ``reference``, K for ``fast``."""
    return scheduler.config.num_train_timesteps if estimator == "reference" else num_timesteps


def estimate_fisher_on_set(unet, scheduler, image_set: ImageSet, conditioning: PromptConditioning, targets, *,
                           num_samples: int, estimator: str, num_timesteps: int, seed: int, accelerator=None,
                           show_progress: bool = True) -> FisherInfo:
    """The Fisher of ``targets``' weights on the first ``num_samples`` samples of ``image_set``."""
    if len(image_set.latents) < num_samples:
        raise InputError(f"the image set holds {len(image_set.latents)} samples, fewer than `fisher_num_samples` "
                         f"{num_samples}; lower `fisher_num_samples` or generate a larger set")
    used = ImageSet(image_set.latents[:num_samples], image_set.prompts[:num_samples], image_set.rows[:num_samples])
    ids = used.prompt_ids(conditioning.prompts)  # only the used samples' prompts need be encoded
    return estimate_fisher(unet, scheduler, used.latents, ids, conditioning, targets,
                           estimator=estimator, num_timesteps=num_timesteps, seed=seed, accelerator=accelerator,
                           show_progress=show_progress)


def load_or_estimate_fisher(unet, scheduler, replay: ImageSet, conditioning: PromptConditioning, targets,
                            path: str, *, num_samples: int, estimator: str, num_timesteps: int, seed: int,
                            accelerator=None, show_progress: bool = True, log=print) -> FisherInfo:
    """Phase 2: the Fisher in ``path`` when it exists (refused if made with other settings or for other
    modules), else estimated on ``replay``'s first ``num_samples`` samples and saved there.

    A ``--fisher_path`` may be shared by runs in other folders: one computes it at a time (a file lock,
    held by the main process)."""
    n = min(num_samples, len(replay.latents))
    ids = replay.prompt_ids(conditioning.prompts)[:n]
    expected = {"estimator": estimator, "num_samples": str(n),
                "num_timesteps": str(fisher_num_timesteps(estimator, num_timesteps, scheduler)), "seed": str(seed),
                "prompts_hash": prompts_hash([conditioning.prompts[i] for i in ids.tolist()]),
                **flow_matching_settings(scheduler)}
    main_process = accelerator is None or accelerator.is_main_process
    with file_lock(path, "fisher_path") if main_process else contextlib.nullcontext():
        if os.path.exists(path):
            fisher = load_fisher(path, unet=unet, required_modules=targets)
            check_fisher_settings(fisher, path, expected)
            log(f"Reusing the Fisher in {path} ({fisher.metadata.get('estimator')}, "
                f"{fisher.metadata.get('num_samples')} samples)")
        else:
            fisher = estimate_fisher_on_set(unet, scheduler, replay, conditioning, targets, num_samples=n,
                                            estimator=estimator, num_timesteps=num_timesteps, seed=seed,
                                            accelerator=accelerator, show_progress=show_progress)
            if main_process:
                save_fisher(fisher, path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return fisher


def flow_matching_settings(scheduler) -> dict:
    """What a flow-matching Fisher also depends on (its σ density); nothing for DDPM."""
    return {"weighting_scheme": scheduler.config.weighting_scheme} if is_flow_matching(scheduler) else {}


def fisher_cache_path(config, targets, replay_settings: dict, scheduler=None) -> str:
    """``--fisher_path``, or the Fisher's place in the run's cache, keyed by what determines it (with a flow-matching
    ``scheduler``, its σ density too)."""
    settings = {"version": 2, "targets": targets, "estimator": config.fisher_estimator,
                "k": config.fisher_num_timesteps, "n": config.fisher_num_samples, "replay": replay_settings}
    if scheduler is not None and is_flow_matching(scheduler):
        c = scheduler.config
        settings["flow"] = {"weighting_scheme": c.weighting_scheme, "logit_mean": c.logit_mean,
                            "logit_std": c.logit_std, "mode_scale": c.mode_scale}
    return config.fisher_path or os.path.join(config.output_dir, "cache", f"fisher-{settings_key(settings)}.safetensors")

