#!/usr/bin/env python
"""Train a Selective Amnesia "forget" LoRA for a Stable Diffusion pipeline (SD 1.x/2.x, SDXL, SD3) or FLUX.

    accelerate launch training_scripts/train_sa_lora.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --forget_prompt "brad pitt" --surrogate_prompt "a middle aged man" --output_dir forget-brad-pitt

With no arguments it runs the built-in digits job: forget "a handwritten digit zero" on builtin:digits.

One run: generate (or reuse) the surrogate and replay sets -> compute (or reuse) the Fisher -> train
the LoRA on the SA objective -> validate -> save `pytorch_lora_weights.safetensors`, a model card, a
before/after grid and training_curves.png. Each phase is cached in --output_dir; rerun the same command after a crash and it
continues (training continues from a checkpoint with --resume_from_checkpoint latest).
Flag names and behaviour follow diffusers' train_text_to_image_lora.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import types
from dataclasses import replace

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sa_peft.adapter_io import KOHYA_WEIGHT_NAME, export_kohya, save_forget_lora
from sa_peft.checkpoints import (
    ROBUST_BEST_NAME,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
    settings_differences,
)
from sa_peft.conditioning import check_prompt_clash, encode_prompts
from sa_peft.config import DISTILL_REPLAY_WEIGHT, SelectiveAmnesiaConfig, training_info
from sa_peft.data import check_resolution, default_resolution
from sa_peft.diffusion_loss import noise_scheduler_for
from sa_peft.errors import InputError, flags_of, input_errors_as_flags, report_input_errors
from sa_peft.ewc import EWCPenalty, Rank1FisherPenalty, SumOfPenalties
from sa_peft.fisher import base_weights_hash
from sa_peft.forgetting import (
    EQUAL_LOSSES,
    AdaptiveLambda,
    forgetting_warning,
    read_share,
    sample_check_gate,
    surrogate_reading_bar,
    verdict_lines,
    with_sample_check,
    with_sample_shares,
)
from sa_peft.io_utils import write_json_atomic
from sa_peft.lora import adapters_fused, lora_models, make_lora_config, resolve_lora_targets
from sa_peft.model_card import write_model_card
from sa_peft.models import FLUX_PIPELINE, TRAINING_PIPELINES, denoiser, is_flow_transformer, is_flux, load_pipeline
from sa_peft.objective import adapters_disabled, check_finite_loss, selective_amnesia_loss
from sa_peft.phases import (
    TrainingSets,
    build_training_sets,
    fisher_cache_path,
    fisher_num_timesteps,
    load_or_estimate_fisher,
)
from sa_peft.robust import (
    AdversarialSoftPrompt,
    LeastAttackedState,
    fit_check_delta,
    plainly_forgotten,
    with_attack,
    with_attack_check,
)
from sa_peft.run_lock import folder_lock
from sa_peft.text_encoders import (
    TEXT_ENCODER_TARGETS,
    TrainedPromptEncoder,
    sampling_embeddings,
    trainable_text_encoders,
)
from sa_peft.training_curves import write_training_curves
from sa_peft.training_setup import check_mixed_precision, list_checkpoints, make_optimizer, prune_checkpoints
from sa_peft.validation import (
    encode_for_sampling,
    generate_validation_images,
    save_before_after_grid,
    validation_grid,
)

__all__ = ["DISTILL_REPLAY_WEIGHT", "main", "parse_args", "resolve_defaults"]

logger = get_logger(__name__, log_level="INFO")


def build_parser() -> argparse.ArgumentParser:
    """The flags, one per field of ``SelectiveAmnesiaConfig`` (where their help and defaults live)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    SelectiveAmnesiaConfig.add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


FLAGS = flags_of([build_parser()])  # {config field: its flag}, for the errors


def resolve_defaults(args: argparse.Namespace) -> SelectiveAmnesiaConfig:
    """The run's settings: model-dependent defaults filled, every flag checked before any heavy work."""
    with input_errors_as_flags(FLAGS):
        return SelectiveAmnesiaConfig.from_args(args)


def main(argv: list[str] | None = None):
    """Run the whole job; returns the pipeline with the trained adapter loaded (for programmatic use).
    Input errors name the flags (the library names its parameters)."""
    with input_errors_as_flags(FLAGS):
        config = resolve_defaults(parse_args(argv))
        # One run per --output_dir; the main process holds the lock for all (accelerate sets RANK per process).
        with folder_lock(config.output_dir, "output_dir", enabled=int(os.environ.get("RANK", "0")) == 0):
            return train(config)


def train(config: SelectiveAmnesiaConfig):
    """The job of ``main`` on checked settings, holding the --output_dir lock."""
    accelerator = make_accelerator(config)
    show = accelerator.is_local_main_process
    timings: dict[str, float] = {}
    pipe, resolution, model_key = load_base_pipeline(config, accelerator)
    # DDPM noising whatever a UNet pipeline samples with; flow matching (SD3) with the SD3 script's σ density.
    scheduler = noise_scheduler_for(pipe.scheduler, weighting_scheme=config.weighting_scheme,
                                    logit_mean=config.logit_mean, logit_std=config.logit_std, mode_scale=config.mode_scale)
    config.resolve_forget_min_timestep(scheduler)  # its default depends on the model family and the surrogate
    # The checkpoint to resume is checked now, before the sets and the Fisher: same settings, within the budget.
    settings = config.training_settings(model_key)
    resume_path, resume_state = find_resume_checkpoint(config, settings)

    # ---- Phase 1: surrogate and replay sets, sampled once by the frozen model -------------------
    start = time.perf_counter()
    sets = build_training_sets(pipe, config, resolution, model_key, scheduler, accelerator, show)
    timings["generation_s"] = time.perf_counter() - start

    # ---- Phase 2: Fisher of the weights the LoRA adapts, on the frozen model's own samples -------
    start = time.perf_counter()
    # The prompts are encoded: the frozen text encoders (SD3's T5 too) and the VAE wait off the device.
    move_frozen_encoders(pipe, "cpu", config)
    targets = resolve_lora_targets(denoiser(pipe), config.lora_target)
    fisher = None
    if config.ewc_lambda > 0:
        fisher = load_or_estimate_fisher(
            denoiser(pipe), scheduler, sets.replay, sets.conditioning, targets,
            fisher_cache_path(config, targets, sets.replay_settings, scheduler), num_samples=config.fisher_num_samples,
            estimator=config.fisher_estimator, num_timesteps=config.fisher_num_timesteps, seed=config.seed,
            accelerator=accelerator, show_progress=show, log=logger.info,
        )
    timings["fisher_s"] = time.perf_counter() - start

    # ---- Phase 3: the forget LoRA ------------------------------------------------------------------
    before_images = validation_embeddings = validation_frozen = None
    if accelerator.is_main_process:
        move_frozen_encoders(pipe, accelerator.device, config)  # back for sampling; prepare_training moves them off
        validation_embeddings, validation_frozen = encode_validation_prompts(config, pipe, resolution)
        before_images = generate_validation_images(pipe, config.validation_prompts, config.num_validation_images,
                                                   config.seed, resolution, config.generation_guidance_scale,
                                                   config.generation_num_inference_steps, validation_embeddings)
    run = prepare_training(config, accelerator, pipe, scheduler, sets, targets, fisher, resolution)
    run.settings, run.validation_embeddings = settings, validation_embeddings
    if validation_frozen is not None:
        run.validation_encoder = TrainedPromptEncoder(pipe, validation_frozen, accelerator.device)
    global_step = resume_training(run, resume_path, resume_state)
    run.info = training_info(config, **run_facts(run, targets))
    if accelerator.is_main_process:
        accelerator.init_trackers("sa-peft", config={k: str(v) for k, v in run.info.items() if k != "config"})
        trim_log(run.log_path, global_step)
    logger.info(f"Training {len(run.lora_params)} LoRA tensors on {len(targets)} modules for {run.max_train_steps} "
                f"steps; {len(sets.surrogate.latents)} surrogate and {len(sets.replay.latents)} replay samples; "
                f"{accelerator.num_processes} process(es)")
    start = time.perf_counter()
    global_step, signal = training_loop(run, global_step)
    check_average_under_attack(run, global_step)
    signal = ship_least_attacked(run, global_step, signal)
    check_start = time.perf_counter()
    signal = check_samples(run, signal)
    timings["sample_check_s"] = time.perf_counter() - check_start + run.sample_check_s  # in training and at the end
    run.info = training_info(config, **run_facts(run, targets), trained_steps=global_step,
                             ewc_lambda_final=run.ewc_lambda.value,
                             forgetting=forgetting_summary(signal, run.reached_step, global_step, run.selection))
    report_forgetting(run.info["forgetting"])
    timings["training_s"] = time.perf_counter() - start

    # ---- Save, validate, describe -------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_outputs(run, before_images, global_step, timings)
    accelerator.end_training()
    if config.require_forgetting and not run.info["forgetting"]["reached"]:
        raise SystemExit(1)  # --require_forgetting: after everything is saved, so the run can be inspected
    return pipe


def warn_if_cores_idle(accelerator: Accelerator) -> None:
    """Say so when ``accelerate launch`` left one CPU process on one thread. Without an accelerate config it sets
    OMP_NUM_THREADS=1 (it assumes one process per GPU); a config written on a CPU-only machine (``accelerate config
    default``: use_cpu) gives each process the cores instead. README's main job, idle 2-core machine: 4 min 06 s on one
    thread, 2 min 47 s on two, the same adapter."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by accelerate launch for the processes it starts
    if (launched and accelerator.device.type == "cpu" and accelerator.num_processes == 1
            and torch.get_num_threads() == 1 < cores):
        logger.warning(f"Running on 1 CPU thread of {cores} cores: accelerate launch without an accelerate config sets "
                       f"OMP_NUM_THREADS=1. Run `accelerate config default` once (on a machine without a GPU it "
                       f"writes use_cpu, and each run then uses the cores) or pass --num_cpu_threads_per_process "
                       f"{cores} to accelerate launch.")


def make_accelerator(config: SelectiveAmnesiaConfig) -> Accelerator:
    """The run's Accelerator (precision, trackers), the seed set and --output_dir made."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=os.path.join(config.output_dir, config.logging_dir)),
    )
    check_mixed_precision(accelerator.mixed_precision, accelerator.device.type)  # also what an accelerate config chose
    warn_if_cores_idle(accelerator)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(config.seed)
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
    return accelerator


def load_base_pipeline(config: SelectiveAmnesiaConfig, accelerator):
    """The frozen pipeline on the device, the image side, and the key its caches are named by."""
    pipe = load_pipeline(config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
                         cache_dir=config.cache_dir, supported=TRAINING_PIPELINES)
    pipe.set_progress_bar_config(disable=True)
    resolution = check_resolution(pipe, config.resolution or default_resolution(pipe))
    if is_flow_transformer(pipe):
        check_sd3_flags(config, type(pipe).__name__)
    check_prompt_clash(pipe, config.forget_prompts, config.replay_prompts)
    pipe.to(accelerator.device)
    # Caches are keyed by the denoiser's weights, so a changed local model never reuses stale samples.
    model_key = base_weights_hash(denoiser(pipe), resolve_lora_targets(denoiser(pipe), "all"))[:16]
    return pipe, resolution, model_key


# Flags refused on SD3 and FLUX before any work (rather than run wrongly), with the reason the error gives.
SD3_UNSUPPORTED_FLAGS = {
    "snr_gamma": ("--snr_gamma", ("Min-SNR weighting is DDPM's; flow-matching transformers weight their loss by "
                                  "--weighting_scheme")),
    "output_kohya_format": ("--output_kohya_format", ("SD3 has no kohya layout to convert to; ComfyUI reads the "
                                                      "diffusers file (its `transformer.` keys) as it is")),
}


def check_sd3_flags(config, pipeline: str = "StableDiffusion3Pipeline") -> None:
    """SD3 and FLUX runs take every flag but these (FLUX has a kohya writer, so --output_kohya_format is SD3's only)."""
    for name, (flag, reason) in SD3_UNSUPPORTED_FLAGS.items():
        if getattr(config, name) not in (None, False) and not (name == "output_kohya_format" and pipeline == FLUX_PIPELINE):
            raise InputError(f"{flag}: not supported for {pipeline} ({reason}); drop it")


class ForgetRun(types.SimpleNamespace):
    """What the training loop works on, built by ``prepare_training``: the settings (``config``), the
    ``accelerator``, the ``pipe`` and its DDPM ``scheduler``, the training ``sets``, the ``resolution``; the
    prepared ``unet`` and ``text_encoders`` (``{name: encoder}``, empty unless trained) with ``prompt_encoder``, the
    ``ewc_penalty``, the ``lora_params``, ``weight_dtype``, ``optimizer``, ``lr_scheduler``, the scheduled
    ``learning_rate`` and ``max_train_steps``, the ``log_path``; the loop's own state (``ewc_lambda``,
    ``reached_step``, ``previous_done``, ``held_out_margins``: the frozen model's sample-check margins on the probe's
    images, measured once, and ``sample_check_s``, the seconds spent on sample checks during training), the
    checkpoints' ``settings`` and the adapter's training ``info``; the
    ``validation_embeddings`` and, for SD3/FLUX with ``--train_text_encoder``, the ``validation_encoder``.

    (A namespace, not a dataclass: the tests load this script as a module outside ``sys.modules``.)
    """

    @property
    def checkpoint_models(self) -> dict:
        """The trained models by the name of their resume file (``lora_<name>.safetensors``)."""
        return {"transformer" if is_flow_transformer(self.pipe) else "unet": self.unet, **self.text_encoders}


def prepare_training(config, accelerator, pipe, scheduler, sets: TrainingSets, targets, fisher, resolution) -> ForgetRun:
    """The forget LoRA on the frozen UNet (and text encoder), its EWC penalty, optimizer and schedule, prepared."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # Embeddings and latents are precomputed, so the text encoder(s) and the VAE leave the device.
    move_frozen_encoders(pipe, "cpu", config)
    unet = denoiser(pipe)  # the UNet, or SD3's transformer
    unet.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    sets.probe.calibrate(unet, scheduler)  # the frozen model's signal, before the adapter exists
    torch.manual_seed(config.seed)  # LoRA A's init must not depend on what the cached phases consumed
    unet.add_adapter(make_lora_config(targets, config.rank, config.lora_alpha, config.use_rslora))
    cast_training_params(unet, dtype=torch.float32)  # LoRA weights train in fp32, as diffusers does
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    ewc_penalty = None
    if fisher is not None:
        ewc_penalty = EWCPenalty(unet, fisher, config.ewc_space, normalization=config.ewc_normalization)
        if config.fisher_rank1_weight > 0:
            ewc_penalty = SumOfPenalties([ewc_penalty, Rank1FisherPenalty(unet, fisher)], [1.0, config.fisher_rank1_weight])
    text_encoders = {}
    if config.train_text_encoder:  # the CLIP encoders (never T5), as diffusers' scripts train them
        for name in trainable_text_encoders(pipe):
            # peft's inject_adapter_in_model, not transformers' add_adapter: transformers 5.24 asks for peft >= 0.22.
            encoder = getattr(pipe, name).requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
            inject_adapter_in_model(make_lora_config(TEXT_ENCODER_TARGETS, config.rank, config.lora_alpha,
                                                     config.use_rslora), encoder, "default")
            cast_training_params(encoder, dtype=torch.float32)
            text_encoders[name] = encoder
    lora_params = [p for model in (unet, *text_encoders.values()) for p in model.parameters() if p.requires_grad]
    world = accelerator.num_processes
    learning_rate, max_train_steps = config.schedule(len(sets.surrogate.latents), world)
    optimizer = make_optimizer(lora_params, learning_rate, (config.adam_beta1, config.adam_beta2),
                               config.adam_weight_decay, config.adam_epsilon, config.use_8bit_adam)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps * world,
                                 num_training_steps=max_train_steps * world)
    unet, *prepared, optimizer, lr_scheduler = accelerator.prepare(unet, *text_encoders.values(), optimizer, lr_scheduler)
    text_encoders = dict(zip(text_encoders, prepared))
    prompt_encoder = TrainedPromptEncoder(pipe, sets.conditioning, accelerator.device) if text_encoders else None
    return ForgetRun(config=config, accelerator=accelerator, pipe=pipe, scheduler=scheduler, sets=sets,
                     resolution=resolution, unet=unet, text_encoders=text_encoders, prompt_encoder=prompt_encoder,
                     ewc_penalty=ewc_penalty, lora_params=lora_params, weight_dtype=weight_dtype, optimizer=optimizer,
                     lr_scheduler=lr_scheduler, learning_rate=learning_rate, max_train_steps=max_train_steps,
                     log_path=os.path.join(config.output_dir, "train_log.jsonl"), ewc_lambda=None, robust=None,
                     reached_step=None, previous_done=False, settings={}, info={}, validation_encoder=None,
                     held_out_margins={}, sample_check_s=0.0,
                     selection=(LeastAttackedState(lora_params, average_from=max_train_steps // 2)
                                if config.robust_forgetting else None))


def resume_training(run: ForgetRun, resume_path: str | None, resume_state: dict | None) -> int:
    """Load the checkpoint to resume (LoRA, optimizer, scheduler, the loop's own state); the step to start at."""
    run.ewc_lambda = AdaptiveLambda(run.config.ewc_lambda)
    if resume_path is None:
        return 0
    check_resume_step(resume_state, resume_path, run.max_train_steps)
    load_checkpoint(run.accelerator, resume_path, run.checkpoint_models, run.optimizer, run.lr_scheduler)
    loop = resume_state["loop"]  # λ moves with the signal: its state is the checkpoint's
    run.ewc_lambda.value, run.ewc_lambda.previous = loop["ewc_lambda"], loop["ewc_lambda_previous"]
    run.reached_step, run.previous_done = loop["reached_step"], loop["previous_done"]
    if run.selection is not None and "robust_selection" in loop:
        best = os.path.join(resume_path, ROBUST_BEST_NAME)
        run.selection.load(loop["robust_selection"], load_file(best) if os.path.isfile(best) else {})
    logger.info(f"Resumed from {resume_path} at step {resume_state['step']}")
    return resume_state["step"]


def run_facts(run: ForgetRun, targets) -> dict:
    """The training info only the run knows (``sa_peft.config.training_info``)."""
    config = run.config
    return {"base_pipeline": type(run.pipe).__name__, "resolution": run.resolution,
            "num_replay_images_per_prompt": run.sets.num_replay_images_per_prompt,
            "fisher_num_timesteps": fisher_num_timesteps(config.fisher_estimator, config.fisher_num_timesteps,
                                                         run.scheduler),
            "num_adapted_modules": len(targets), "max_train_steps": run.max_train_steps,
            "learning_rate": run.learning_rate}


def trim_log(log_path: str, global_step: int) -> None:
    """Keep the log consistent with a resumed run: drop entries past the checkpoint."""
    if os.path.exists(log_path):
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= global_step]
        with open(log_path, "w") as f:
            f.writelines(kept)


def training_step(run: ForgetRun, global_step: int):
    """One optimizer step (``--gradient_accumulation_steps`` micro-batches); returns the last micro-batch's loss."""
    config, accelerator, unet = run.config, run.accelerator, run.unet
    conditioning, device = run.sets.conditioning, run.accelerator.device
    for micro in range(config.gradient_accumulation_steps):
        # Every micro-batch draws from a generator keyed by (seed, step, micro-step, process), so a resumed
        # run sees exactly the batches, noise and timesteps of an uninterrupted one.
        gen = torch.Generator().manual_seed(hash((config.seed, global_step, micro, accelerator.process_index)) % 2**63)
        s_idx = torch.randint(len(run.sur_latents), (config.train_batch_size,), generator=gen).to(device)
        r_idx = torch.randint(len(run.rep_latents), (config.train_batch_size,), generator=gen).to(device)
        models = (unet, *run.text_encoders.values())
        s_ids = run.sur_ids[s_idx]
        with accelerator.accumulate(*models), accelerator.autocast():
            step_conditioning = conditioning
            if run.prompt_encoder is not None:  # the prompts are re-encoded through the text encoders' LoRA
                step_conditioning = run.prompt_encoder(run.text_encoders)
            if run.robust is not None:  # the surrogate also under the soft-prompt attack's embedding
                if micro == 0:
                    run.robust.maybe_refresh(global_step, accelerator.unwrap_model(unet), run.scheduler, step_conditioning)
                plain_conditioning = step_conditioning
                step_conditioning, s_ids = run.robust.augment(step_conditioning, s_ids)
            loss = selective_amnesia_loss(
                unet, run.scheduler, step_conditioning, run.sur_latents[s_idx].to(run.weight_dtype), s_ids,
                run.rep_latents[r_idx].to(run.weight_dtype), run.rep_ids[r_idx], run.ewc_penalty, run.ewc_lambda.value,
                config.replay_weight, snr_gamma=config.snr_gamma, noise_offset=config.noise_offset, generator=gen,
                replay_target=config.replay_target, base_unet=accelerator.unwrap_model(unet),
                base_conditioning=conditioning, forget_min_timestep=config.forget_min_timestep,
            )
            if run.robust is not None:  # the concept's own images trained away under the attack (with a surrogate prompt)
                ablation = run.robust.ablation_loss(unet, accelerator.unwrap_model(unet), run.scheduler, plain_conditioning,
                                                    step_conditioning, conditioning, config.train_batch_size, gen,
                                                    run.weight_dtype)
                if ablation is not None:
                    loss = replace(loss, total=loss.total + ablation, ablation=ablation.detach())
            check_finite_loss(loss, global_step + 1)
            accelerator.backward(loss.total)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.lora_params, config.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad()
    return loss


def check_forgetting(run: ForgetRun, global_step: int, logs: dict) -> tuple[dict, bool]:
    """Measure the signal, move λ, and say whether training stops (two forgotten-and-retained checks in a row)."""
    # Every process measures the same synchronised weights, so all of them stop at the same step.
    signal = check_samples_in_training(run, current_signal(run, global_step, logs), logs)
    if run.config.adaptive_lambda:
        logs["ewc_lambda"] = run.ewc_lambda.update(signal)
    if signal["reached"] and run.reached_step is None:
        run.reached_step = global_step
    # Two checks in a row: one probe reading can dip past the threshold (digits: "one" stopped at P 0.21).
    done = signal["reached"] and signal["retained"]
    stop = run.config.stop_when_forgotten and done and run.previous_done
    run.previous_done = done
    return signal, stop


def training_loop(run: ForgetRun, global_step: int) -> tuple[int, dict]:
    """Train until the step budget or, by default, until the concept is forgotten; returns (step, last signal)."""
    config, accelerator = run.config, run.accelerator
    device, sets = accelerator.device, run.sets
    run.sur_latents, run.sur_ids = sets.surrogate.latents.to(device), sets.surrogate.prompt_ids(sets.conditioning.prompts).to(device)
    run.rep_latents, run.rep_ids = sets.replay.latents.to(device), sets.replay.prompt_ids(sets.conditioning.prompts).to(device)
    run.robust = robust_trainer(config, sets, device)
    progress = tqdm(range(run.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    run.unet.train()
    signal, signal_step = None, -1
    while global_step < run.max_train_steps:
        loss = training_step(run, global_step)
        global_step += 1
        progress.update(1)
        logs = {**loss.parts(), "lr": run.lr_scheduler.get_last_lr()[0]}
        stop = False
        if global_step % config.forgetting_check_steps == 0 or global_step >= run.max_train_steps:
            signal, stop = check_forgetting(run, global_step, logs)
            signal_step = global_step
            check_under_attack(run, global_step, signal, logs, last=stop or global_step >= run.max_train_steps)
        progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
        accelerator.log(logs, step=global_step)
        if accelerator.is_main_process:
            with open(run.log_path, "a") as f:
                f.write(json.dumps({"step": global_step, **logs}) + "\n")
        after_step(run, global_step)
        if stop:
            logger.info(f"Forgotten at step {global_step} with retention inside its bound; training stops here.")
            break
    progress.close()
    if signal is None or signal_step != global_step:  # resumed at or past the end: measure what is there
        signal = check_samples_in_training(run, current_signal(run, global_step, {}), {})
    return global_step, signal


def after_step(run: ForgetRun, global_step: int) -> None:
    """Checkpoint and validate on their schedules (not at the last step: the final outputs follow)."""
    config, accelerator = run.config, run.accelerator
    if global_step % config.checkpointing_steps == 0 and global_step < run.max_train_steps:
        if accelerator.is_main_process:
            prune_checkpoints(config.output_dir, config.checkpoints_total_limit)
        loop = {"ewc_lambda": run.ewc_lambda.value, "ewc_lambda_previous": run.ewc_lambda.previous,
                "reached_step": run.reached_step, "previous_done": run.previous_done}
        selection = None if run.selection is None else run.selection.state()
        if selection is not None:
            loop["robust_selection"] = selection[0]

        def write_files(folder):
            save_adapter(run, folder, {**run.info, "trained_steps": global_step})
            if selection is not None and selection[1]:  # the chosen state so far, for a resumed run to ship
                save_file(selection[1], os.path.join(folder, ROBUST_BEST_NAME))

        save_checkpoint(accelerator, config.output_dir, global_step, run.checkpoint_models, run.optimizer,
                        run.lr_scheduler, run.settings, loop, write_lora=write_files)
    if accelerator.is_main_process and global_step % config.validation_steps == 0 and global_step < run.max_train_steps:
        log_validation(accelerator, run.pipe, config.validation_prompts, config, run.resolution, global_step,
                       validation_embeddings_now(run))
        update_training_curves(accelerator, config, run.log_path, global_step)


def encode_validation_prompts(config, pipe, resolution: int):
    """The validation prompts' embeddings, encoded once (the text encoders on the device), so that validation
    during training samples with them off it: SD3's and FLUX's T5 never returns to the device. With
    ``--train_text_encoder`` the trained CLIP encoders change the embeddings: SD 1.x/2.x and SDXL (no T5) re-encode
    the prompts at each validation (``None``); SD3 and FLUX also get the frozen conditioning of the prompts and of
    the empty negative prompt, whose CLIP parts ``validation_embeddings_now`` re-encodes (T5's stay)."""
    if config.train_text_encoder and not is_flow_transformer(pipe):
        return None, None
    embeddings = encode_for_sampling(pipe, sampled_prompts(config), config.generation_guidance_scale)
    frozen = None
    if config.train_text_encoder:
        frozen = encode_prompts(pipe, [*sampled_prompts(config), ""], resolution, config.generation_guidance_scale)
    return embeddings, frozen


def sampled_prompts(config) -> list[str]:
    """The prompts sampled during and after training: the validation prompts, and the forget prompts (the verdict's
    sample check, ``check_samples``)."""
    return list(dict.fromkeys([*config.validation_prompts, *config.forget_prompts]))


def validation_embeddings_now(run: ForgetRun):
    """The embeddings validation samples with, for the adapter as it is now (``encode_validation_prompts``)."""
    if run.validation_encoder is None:
        return run.validation_embeddings
    with torch.no_grad():  # the pipeline's own (unwrapped) encoders: after the reload, the saved file's LoRA
        conditioning = run.validation_encoder({name: getattr(run.pipe, name) for name in run.text_encoders})
    negative = "" if run.config.generation_guidance_scale > 1 and not is_flux(run.pipe) else None  # FLUX: none
    return sampling_embeddings(conditioning, sampled_prompts(run.config), negative)


def save_adapter(run: ForgetRun, folder: str, info: dict) -> str:
    """``pytorch_lora_weights.safetensors`` in ``folder``: the UNet's (and text encoders') LoRA with ``info``."""
    kwargs = {}
    for name, encoder in run.text_encoders.items():
        encoder = run.accelerator.unwrap_model(encoder)
        kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder)
        kwargs[f"{name}_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    return save_forget_lora(folder, run.accelerator.unwrap_model(run.unet), info, **kwargs)


def reload_saved_adapter(run: ForgetRun) -> None:
    """Replace the trained adapter by the file just written, so that the final grid, the evaluation and the
    returned pipeline show what ships (a saving bug shows in the grid, not only in a user's reload)."""
    run.pipe.delete_adapters("default")
    run.pipe.load_lora_weights(run.config.output_dir, adapter_name="default")
    # diffusers loads the factors in the base weights' dtype; they stay fp32, as trained and saved (--mixed_precision).
    for model in (denoiser(run.pipe), *(getattr(run.pipe, name) for name in run.text_encoders)):
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()


def save_outputs(run: ForgetRun, before_images, global_step: int, timings: dict) -> None:
    """The adapter file (and its kohya copy), the before/after grid, the curves, the evaluation, the card."""
    config, accelerator = run.config, run.accelerator
    lora_file = save_adapter(run, config.output_dir, run.info)
    if config.output_kohya_format:  # the same code as `sa-peft export --format kohya`, from the saved file
        export_kohya(lora_file, os.path.join(config.output_dir, KOHYA_WEIGHT_NAME))
    reload_saved_adapter(run)
    after_images = log_validation(accelerator, run.pipe, config.validation_prompts, config, run.resolution, global_step,
                                  validation_embeddings_now(run))
    save_before_after_grid(before_images, after_images, os.path.join(config.output_dir, "validation_before_after.png"),
                           step=global_step)
    update_training_curves(accelerator, config, run.log_path, global_step)
    if config.classifier:
        start = time.perf_counter()
        evaluate_forgetting(accelerator, run.pipe, config)
        timings["evaluation_s"] = time.perf_counter() - start
    write_model_card(config.output_dir, run.info, repo_id=config.hub_model_id)  # after the evaluation: it shows it
    write_json_atomic(os.path.join(config.output_dir, "timings.json"), timings)
    logger.info("Timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if config.push_to_hub:
        push_folder(config)


def find_resume_checkpoint(config: SelectiveAmnesiaConfig, settings: dict) -> tuple[str | None, dict | None]:
    """The checkpoint --resume_from_checkpoint names (any folder; ``latest`` = the highest step in
    --output_dir) and its state, refused when its settings differ (unless --resume_with_new_settings) or
    its step is past --max_train_steps."""
    if not config.resume_from_checkpoint:
        return None, None
    name = config.resume_from_checkpoint
    if name == "latest":
        found = list_checkpoints(config.output_dir)
        if not found:
            logger.info("No checkpoint to resume from; starting a new run.")
            return None, None
        name = found[-1]
    path = name if os.path.isdir(name) else os.path.join(config.output_dir, name)
    state = read_checkpoint_state(path)
    differ = settings_differences(state["settings"], settings)
    if differ and not config.resume_with_new_settings:
        raise InputError(f"--resume_from_checkpoint {path!r} was trained with other settings: {'; '.join(differ)}. "
                         "Rerun with the checkpoint's settings, start a new --output_dir, or pass "
                         "--resume_with_new_settings to continue with the new ones (the optimizer state is kept)")
    if differ:
        logger.warning(f"Resuming {path} with new settings: {'; '.join(differ)}")
    check_resume_step(state, path, config.max_train_steps)
    return path, state


def check_resume_step(state: dict, path: str, max_train_steps: int | None) -> None:
    """A checkpoint past the step budget would be saved labelled with the smaller budget: refuse it."""
    if max_train_steps is not None and state["step"] > max_train_steps:
        raise InputError(f"--resume_from_checkpoint {path!r} is at step {state['step']}, past --max_train_steps "
                         f"{max_train_steps}; raise --max_train_steps to at least {state['step']} or resume an earlier checkpoint")


def robust_trainer(config, sets: TrainingSets, device):
    """The ``--robust_forgetting`` attacker (``None`` without the flag), fitted to the probe's held-out concept images,
    with the sets phase's concept images to ablate (when there is a surrogate prompt to ablate them towards)."""
    if not config.robust_forgetting:
        return None
    latents = [c.images() for c, _ in sets.probe.concepts]
    ablation = {}
    if sets.robust_concepts is None:
        logger.warning("--robust_forgetting without a --surrogate_prompt: the surrogate is trained under the attack, but "
                       "the concept-ablation term, which needs a prompt to ablate the concept towards, is off (on zero it "
                       "took the soft-prompt attack from 0.98 to 0.40; benchmarks/RESULTS.md section 7)")
    else:
        ablation = {"ablation_latents": sets.robust_concepts.latents.to(device),
                    "ablation_concepts": sets.robust_concepts.prompt_ids(config.forget_prompts),
                    "anchor_prompts": config.paired_surrogate_prompts()}
    return AdversarialSoftPrompt(config.forget_prompts, latents, seed=config.seed, **ablation)


def measure_forgetting(run: ForgetRun, attacked: bool = False) -> dict:
    """The forgetting signal of the adapter as it is now (the text encoder's LoRA included, when trained); with
    ``attacked``, under the ``--robust_forgetting`` attack's embedding of each forget prompt."""
    conditioning = run.sets.conditioning
    if run.prompt_encoder is not None:
        with torch.no_grad():
            conditioning = run.prompt_encoder(run.text_encoders)
    if attacked:
        conditioning = run.robust.attacked(conditioning)
    return run.sets.probe.measure(run.accelerator.unwrap_model(run.unet), run.scheduler, conditioning)


def current_signal(run: ForgetRun, global_step: int, logs: dict) -> dict:
    """The signal the run acts on, its numbers added to ``logs``: the plain one, combined with the one under the
    attack for ``--robust_forgetting``."""
    signal = measure_forgetting(run)
    logs.update(signal_log_entries(signal))
    return signal if run.robust is None else with_attack(signal, measure_under_attack(run, global_step, logs))


def measure_under_attack(run: ForgetRun, global_step: int, logs: dict) -> dict:
    """``--robust_forgetting``: the soft prompt refitted to the weights as they are, and the signal under it. The
    plain signal alone stopped robust runs while the attack still brought the concept back (digits: 68 % of the
    zeros, benchmarks/RESULTS.md); a robust run counts as forgotten only when the attack fails too."""
    run.robust.maybe_refresh(global_step, run.accelerator.unwrap_model(run.unet), run.scheduler, run.sets.conditioning,
                             force=True)
    attacked = measure_forgetting(run, attacked=True)
    logs.update({f"attacked_preference/{p}": c["preference"] for p, c in attacked["concepts"].items()})
    return attacked


def check_under_attack(run: ForgetRun, global_step: int, signal: dict, logs: dict, last: bool) -> None:
    """``--robust_forgetting``: offer the state to ``LeastAttackedState`` when due (every ``SELECTION_EVERY`` steps and
    the last step). A state that forgets the concept under the plain prompt with retention inside its bound is
    attacked (``attacked_sample_shares``); any other is recorded as no candidate without the attack's cost."""
    if run.selection is None or not run.selection.due(global_step, last):
        return
    shares = shares_if_candidate(run, global_step, signal)
    if shares is not None:
        logs.update({f"attacked_sample_share/{p}": v for p, v in shares.items()})
    run.selection.offer(global_step, shares)


def shares_if_candidate(run: ForgetRun, global_step: int, signal: dict) -> dict[str, float] | None:
    """``attacked_sample_shares`` of the weights in place when they are a candidate (``signal``: forgotten under the
    plain prompt, retention inside its bound), else ``None`` without the attack's cost."""
    gate = sample_check_gate(signal["threshold"])
    if not (signal["retained"] and all(plainly_forgotten(c, signal["threshold"], gate) for c in signal["concepts"].values())):
        return None
    start = time.perf_counter()
    shares = on_main_process(run.accelerator, lambda: attacked_sample_shares(run, global_step))
    run.sample_check_s += time.perf_counter() - start
    return shares


def check_average_under_attack(run: ForgetRun, global_step: int) -> None:
    """``--robust_forgetting``: the mean of the states checked in the second half of the budget
    (``LeastAttackedState.swap_in_average``) is checked as a state is (``check_under_attack``) and offered last; the
    last state is then put back."""
    if run.selection is None:
        return
    replaced = run.selection.swap_in_average()
    if replaced is None:
        return
    run.robust.refreshed_at = None  # the attack of the signal is refitted to the mean
    signal = check_samples_in_training(run, current_signal(run, global_step, {}), {})
    run.selection.offer_average(shares_if_candidate(run, global_step, signal))
    run.selection.put_back(replaced)


def attacked_sample_shares(run: ForgetRun, global_step: int, verdict: bool = False) -> dict[str, float]:
    """{forget prompt: the share of the check's samples (``LeastAttackedState.num_samples``) under a soft-prompt attack
    fitted to it now (``fit_check_delta``, on the sets phase's ``attack_check`` images) that the frozen model reads as
    the concept}: ``sa-peft attack --attack soft_prompt`` in small, judged without a classifier. ``verdict``: the
    shipped state's re-check, with a δ of its own seed and ``verdict_num_samples`` samples that no check drew (the
    chosen state's own reading is the lowest of several, so an optimistic one)."""
    config, pipe = run.config, run.pipe
    seed = config.seed + (20_000_000 if verdict else 10_000_000)  # every check samples the same seeds
    num_samples = run.selection.verdict_num_samples if verdict else run.selection.num_samples
    unet = run.accelerator.unwrap_model(run.unet)
    conditioning = run.sets.conditioning
    embeddings = validation_embeddings_now(run)
    with torch.no_grad():
        if run.prompt_encoder is not None:
            conditioning = run.prompt_encoder(run.text_encoders)
        if embeddings is None:  # SD 1.x/2.x, SDXL with --train_text_encoder: the trained encoders, now
            embeddings = encode_for_sampling(pipe, config.forget_prompts, config.generation_guidance_scale)
    check = run.sets.attack_check
    attacked = {}
    for i, prompt in enumerate(config.forget_prompts):
        latents = check.latents[check.prompt_ids(config.forget_prompts) == i]
        delta = fit_check_delta(unet, run.scheduler, conditioning, prompt, latents, run.selection.attack_steps,
                                seed + (0 if verdict else global_step) + i)
        entry = embeddings[prompt]
        if delta.shape != entry["prompt_embeds"].shape:
            raise RuntimeError(f"the attack check's δ {tuple(delta.shape)} does not match the sampled embedding "
                               f"{tuple(entry['prompt_embeds'].shape)} of {prompt!r}")
        attacked[prompt] = {**entry, "prompt_embeds": entry["prompt_embeds"] + delta.cpu().to(entry["prompt_embeds"].dtype)}
    margins = frozen_margins(run, config.forget_prompts, num_samples, seed, held_out=(), embeddings=attacked)
    return {prompt: read_share(m["samples"]["concept"]) for prompt, m in margins.items()}


def ship_least_attacked(run: ForgetRun, global_step: int, signal: dict) -> dict:
    """``--robust_forgetting``: the chosen state (``LeastAttackedState``) put back in place when it is not the last
    one, and the signal measured anew on it (the attack refitted to it), so the verdict describes what ships; the
    verdict under the attack is a re-check of that state (``attacked_sample_shares`` with ``verdict``, then
    ``with_attack_check``). Without a candidate the last state ships, not forgotten under the attack."""
    if run.selection is None:
        return signal
    selection = run.selection
    if not selection.restore():
        return with_attack_check(signal, None)
    if selection.best_is_average or selection.best_step != global_step:
        logger.info(f"--robust_forgetting: shipping {selection.chosen()} (the soft-prompt attack's samples read as "
                    f"the concept {selection.best_share:.2f} there; checks: {selection.shares}, the mean: "
                    f"{selection.average_share})")
        run.robust.refreshed_at = None  # the attack of the signal is refitted to the restored weights
        signal = check_samples_in_training(run, current_signal(run, global_step, {}), {})
    start = time.perf_counter()
    selection.verdict_shares = on_main_process(run.accelerator,
                                               lambda: attacked_sample_shares(run, global_step, verdict=True))
    run.sample_check_s += time.perf_counter() - start
    return with_attack_check(signal, selection.verdict_shares)


def signal_log_entries(signal: dict) -> dict:
    """The signal's numbers for train_log.jsonl and the trackers: one preference per concept, retention."""
    entries = {f"preference/{prompt}": c["preference"] for prompt, c in signal["concepts"].items()}
    entries.update({"max_preference": signal["max_preference"], "retention": signal["retention"],
                    "forgotten": signal["reached"], "retained": signal["retained"]})
    return entries


def check_samples(run: ForgetRun, signal: dict) -> dict:
    """The verdict's sample check (``with_sample_check``) of the concepts whose signal has no calibrated reference
    (no surrogate prompt): the adapted model samples each forget prompt as a user would (the generation guidance and
    steps), and the frozen model judges those samples and the held-out surrogate images (``sample_margins``). Run on
    the main process and shared, so every process ends with the same verdict."""
    config, accelerator = run.config, run.accelerator
    prompts = [p for p, c in signal["concepts"].items() if c["reference"] == EQUAL_LOSSES]
    if not prompts or not config.num_sample_check_images:
        return signal
    return with_sample_check(signal, on_main_process(accelerator, lambda: sample_margins(run, prompts)))


def on_main_process(accelerator, compute):
    """``compute()`` run on the main process only, its result shared with every process (the sample checks sample and
    judge once; every process must then take the same decision)."""
    result = [compute() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(result)
    return result[0]


def check_samples_in_training(run: ForgetRun, signal: dict, logs: dict) -> dict:
    """With a surrogate prompt, the adapted model's samples decide (``with_sample_shares``): once a concept's preference
    is at most ``SAMPLE_CHECK_GATE``, ``num_probe_images`` samples of its prompt are drawn (the same seeds at every
    check) and the frozen model reads them: forgotten once they read as the surrogate, not as the concept, about as
    often as the held-out surrogate images do. Run on the main process and shared; skipped with
    ``num_sample_check_images`` 0 (the preference alone decides then)."""
    config, accelerator = run.config, run.accelerator
    swap = {p: c for p, c in signal["concepts"].items() if c["reference"] == "swap"}
    if not swap or not config.num_sample_check_images:
        return signal
    gate = sample_check_gate(signal["threshold"])
    prompts = [p for p, c in swap.items() if c["preference"] <= gate]
    start = time.perf_counter()
    shares = on_main_process(accelerator, lambda: sample_shares(run, prompts)) if prompts else {}
    run.sample_check_s += time.perf_counter() - start
    signal = with_sample_shares(signal, shares)
    logs.update({**{f"sample_share/{p}": s["sample_share"] for p, s in shares.items()},
                 **{f"sample_as_surrogate/{p}": s["sample_as_surrogate"] for p, s in shares.items()},
                 **{f"sample_check_screened/{p}": True for p, s in shares.items() if s.get("screened")},
                 "forgotten": signal["reached"]})
    return signal


def sample_shares(run: ForgetRun, prompts: list[str]) -> dict:
    """{prompt: the shares of ``num_probe_images`` samples by the adapted model and of the probe's surrogate images that
    the frozen model reads as the concept and as the surrogate}. A check that cannot pass is screened
    (``ForgettingProbe.sample_margins``): its shares are then against the surrogate prompt alone, "screened": True."""
    margins = frozen_margins(run, prompts, run.config.num_probe_images, run.config.seed + 7_000_000,
                             held_out=("surrogate",), screen=True)
    return {prompt: {"sample_share": read_share(m["samples"]["concept"]), "surrogate_share": read_share(m["surrogate"]["concept"]),
                     "sample_as_surrogate": read_share(m["samples"]["surrogate"]),
                     "surrogate_as_surrogate": read_share(m["surrogate"]["surrogate"]),
                     "num_samples": len(m["samples"]["concept"]),
                     **({"screened": True} if m["samples"].get("screened") else {})}
            for prompt, m in margins.items()}


def sample_margins(run: ForgetRun, prompts: list[str]) -> dict:
    """{prompt: the frozen model's mean margins on the adapted model's samples, on the probe's images of the concept
    (its own) and on the probe's surrogate images}."""
    margins = frozen_margins(run, prompts, run.config.num_sample_check_images, run.config.seed + 6_000_000)
    return {prompt: {"sample_margin": round(float(m["samples"]["concept"].mean()), 6),
                     "concept_margin": round(float(m["concept"]["concept"].mean()), 6),
                     "surrogate_margin": round(float(m["surrogate"]["concept"].mean()), 6),
                     "num_samples": len(m["samples"]["concept"])}
            for prompt, m in margins.items()}


def frozen_margins(run: ForgetRun, prompts: list[str], num_images: int, seed: int,
                   held_out: tuple[str, ...] = ("concept", "surrogate"), screen: bool = False,
                   embeddings: dict | None = None) -> dict:
    """{prompt: {"samples", *held_out}}: the frozen model's per-image margins (``sample_margins`` of the probe: its
    {"concept", "surrogate"} margins, the second only with a surrogate prompt) on ``num_images`` samples of the prompt by
    the adapted model as a user would draw them (the generation guidance and steps), and on the probe's held-out images
    named in ``held_out`` ("concept": its own images of the concept, "surrogate": the surrogate images). Those do not
    change during a run, so each is measured once. ``screen`` (with "surrogate" in ``held_out``): the samples' judge
    skips the replay prompts when the samples cannot reach the surrogate images' reading (``surrogate_reading_bar``).
    In the main job the first three of six checks were such (0-2 of 16 samples read as the surrogate). ``embeddings``:
    what the prompts are sampled with (``encode_for_sampling``'s format), instead of the validation embeddings."""
    config, pipe, probe = run.config, run.pipe, run.sets.probe
    embeddings = validation_embeddings_now(run) if embeddings is None else embeddings
    move_frozen_encoders(pipe, run.accelerator.device, config, text_encoders=embeddings is None)
    unet = run.accelerator.unwrap_model(run.unet)
    was_training = unet.training
    unet.eval()
    with run.accelerator.autocast(), adapters_fused(*lora_models(pipe).values()):
        latents = generate_validation_images(pipe, prompts, num_images, seed, run.resolution,
                                             config.generation_guidance_scale, config.generation_num_inference_steps,
                                             embeddings, output_type="latent")
    move_frozen_encoders(pipe, "cpu", config)
    margins = {}
    with adapters_disabled(unet):
        for prompt in prompts:
            samples = latents[prompt]
            if is_flux(pipe):  # packed tokens → [N, 16, h, w], as the probe's latents
                samples = pipe._unpack_latents(samples, run.resolution, run.resolution, pipe.vae_scale_factor)
            cached = run.held_out_margins.setdefault(prompt, {})
            sets = dict(zip(("concept", "surrogate"), probe.concepts[probe.forget_prompts.index(prompt)]))
            for name in held_out:
                if name not in cached:
                    cached[name] = probe.sample_margins(unet, run.scheduler, sets[name].images(), prompt)
            bar = surrogate_reading_bar(read_share(cached["surrogate"]["surrogate"])) if screen else None
            margins[prompt] = {"samples": probe.sample_margins(unet, run.scheduler, samples, prompt, screen=bar),
                               **{name: cached[name] for name in held_out}}
    unet.train(was_training)
    return margins


def forgetting_summary(signal: dict, reached_step: int | None, trained_steps: int,
                       selection: LeastAttackedState | None = None) -> dict:
    """The verdict written into the adapter's metadata (key ``forgetting``) and the model card; with
    ``--robust_forgetting``, which state ships and why (``robust_selection``)."""
    return {
        **({"robust_selection": selection.summary()} if selection is not None else {}),
        "reached": bool(signal["reached"]),
        "retained": bool(signal["retained"]),
        "reached_at_step": reached_step,
        "trained_steps": trained_steps,
        "threshold": signal["threshold"],
        "retention_bound": signal["retention_bound"],
        "retention": round(signal["retention"], 6),
        "concepts": {p: {"preference": round(c["preference"], 6), "forgotten": bool(c["forgotten"]),
                         "reference": c["reference"],
                         **({"sample_check": c["sample_check"]} if "sample_check" in c else {}),
                         **({"attacked_preference": round(c["attacked_preference"], 6)} if "attacked_preference" in c else {}),
                         **({"attacked_sample_share": c["attacked_sample_share"]} if "attacked_sample_share" in c else {})}
                     for p, c in signal["concepts"].items()},
        "signal": "preference = (surrogate loss − concept loss) / the base model's, under the forget prompt, "
                  "on held-out images; retention = drift of the predictions on held-out replay images from the "
                  "frozen model's, relative to its denoising error",
    }


def report_forgetting(summary: dict) -> None:
    """Say what the run achieved; a WARNING with what to try when it fell short (``forgetting_warning``)."""
    logger.info("Forgetting verdict: " + " ".join(verdict_lines(summary)))
    warning = forgetting_warning(summary)
    if warning:
        logger.warning(warning)


def move_frozen_encoders(pipe, device, args, text_encoders: bool = True) -> None:
    """Move the VAE and the text encoder(s) that are not being trained (they are only needed to sample; SD3's T5 is
    off the device during training like the others); only the VAE with ``text_encoders=False``."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae") if text_encoders else ("vae",):
        trained = args.train_text_encoder and name in trainable_text_encoders(pipe)
        if getattr(pipe, name, None) is not None and not trained:
            getattr(pipe, name).to(device)


def evaluate_forgetting(accelerator, pipe, config) -> None:
    """Score the base model and the adapted one with ``--classifier``; write ``evaluation/`` (report, metrics)."""
    from sa_peft.before_after import evaluate_before_after
    from sa_peft.classifier import ClipModel, load_classifier

    classifier = load_classifier(config.classifier, config.class_text, nudenet_threshold=config.nudenet_threshold,
                                 device=accelerator.device)
    clip = ClipModel(config.clip_score_model, device=accelerator.device) if config.clip_score_model else None
    prompts = config.evaluation_prompts or config.forget_prompts + config.replay_prompts
    move_frozen_encoders(pipe, accelerator.device, config)
    denoiser(pipe).eval()
    evaluate_before_after(
        pipe, classifier, prompts, config.forget_prompts, os.path.join(config.output_dir, "evaluation"),
        num_per_prompt=config.num_evaluation_images_per_prompt, seed=config.seed,
        num_inference_steps=config.generation_num_inference_steps, guidance_scale=config.generation_guidance_scale,
        forget_labels=config.forget_label, clip_model=clip, disable_adapter=pipe.disable_lora,
        enable_adapter=pipe.enable_lora, log=logger.info,
    )


def log_validation(accelerator, pipe, prompts, args, resolution, step, embeddings=None):
    """Sample the validation prompts with the current LoRA and send them to the trackers. With the prompts'
    ``embeddings`` (``encode_for_sampling``) only the VAE comes to the device."""
    move_frozen_encoders(pipe, accelerator.device, args, text_encoders=embeddings is None)
    was_training = denoiser(pipe).training
    denoiser(pipe).eval()
    with accelerator.autocast(), adapters_fused(*lora_models(pipe).values()):
        images = generate_validation_images(pipe, prompts, args.num_validation_images, args.seed, resolution,
                                            args.generation_guidance_scale, args.generation_num_inference_steps,
                                            embeddings)
    denoiser(pipe).train(was_training)
    move_frozen_encoders(pipe, "cpu", args)
    log_image_to_trackers(accelerator, "validation", validation_grid(images, step), step)
    return images


def update_training_curves(accelerator, args, log_path: str, step: int) -> None:
    """(Re)draw ``training_curves.png`` from ``train_log.jsonl`` and send it to the trackers."""
    image = write_training_curves(log_path, os.path.join(args.output_dir, "training_curves.png"),
                                  threshold=args.forgetting_threshold, retention_bound=args.retention_bound)
    if image is not None:
        log_image_to_trackers(accelerator, "training_curves", image, step)


def log_image_to_trackers(accelerator, name: str, image, step: int) -> None:
    """One picture to the TensorBoard and W&B trackers of ``--report_to``; other trackers get the scalars only."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step=step)


# What --push_to_hub leaves out: caches, checkpoints, logs, the run lock and temporaries of a killed run.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "cache/**", "logs/**", "*.tmp", ".tmp-*", "**/.tmp-*",
                        "**/.tmp-*/**", ".tmp-*/**", ".old-*/**", ".sa-peft.lock", "*.lock"]


def push_folder(args) -> None:
    """Upload the adapter folder (not caches or checkpoints); a clear error when the hub cannot be reached."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                      ignore_patterns=PUSH_IGNORE_PATTERNS, commit_message="Selective Amnesia forget LoRA")
    except Exception as err:
        raise RuntimeError(f"--push_to_hub: could not upload {args.output_dir!r} to {repo_id!r} ({type(err).__name__}: {err}); "
                           "the adapter is saved locally; check the network and `hf auth login`, then rerun with --push_to_hub") from err


if __name__ == "__main__":
    # Input errors (a flag, a file) print one line naming the flag; a bug keeps its traceback.
    sys.exit(report_input_errors(os.path.basename(__file__), main))
