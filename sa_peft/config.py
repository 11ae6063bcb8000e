"""The settings of a forget run: one dataclass, its command-line flags, and the training info it records.

``SelectiveAmnesiaConfig`` is built from the training script's flags (``from_args``), resolves the
model-dependent presets (the built-in digits job) in one place and checks every value in
``__post_init__``, before any model is loaded. The adapter header records it whole (key ``config``
of the ``sa_peft`` entry), next to the flat training-info fields of ``TRAINING_INFO_FIELDS``, which
``sa-peft inspect`` prints and the model card quotes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from .checks import check_number, check_output_apart, check_positive_int, check_writable
from .data import SURROGATE_TYPES
from .defaults import DEFAULT_REPLAY_PROMPTS_FILE, DIGITS_MODELS, digits_defaults
from .diffusion_loss import WEIGHTING_SCHEMES, is_flow_matching
from .errors import InputError, MissingInputError, with_flags
from .fisher import ESTIMATORS
from .forgetting import DEFAULT_PREFERENCE_THRESHOLD, DEFAULT_RETENTION_BOUND
from .lora import LORA_TARGET_PRESETS
from .objective import REPLAY_TARGETS
from .prompts import check_prompts, read_prompts_file

D = " (default: %(default)s)"
# The distilled replay loss ‖ε_θ − ε_θ*‖² is ~10⁻³ of the noise-target loss, so γ = 1 (the paper's, for the noise
# target) barely weighs it: on the digits the retained Fréchet distance rose 11-17 % forgetting one, three or
# eight at γ = 1, 1-3 % at γ = 30, with the same step counts (benchmarks/RESULTS.md).
DISTILL_REPLAY_WEIGHT = 30.0
# A noise surrogate trains the forget term on the noisiest half of the DDPM schedule only, and the signal measures the
# concept there. Pixel noise puts its loss on the low-noise timesteps, while the concept's shape is decided at high
# noise. Over all timesteps 5 of 20 digit rows (ten digits, two seeds) met their target ("four" kept 18 of 50 samples,
# P 0.250); on the noisiest half 10 of 20 (four: P 0.078), stopping after 100-150 steps; one and eight got worse
# (benchmarks/RESULTS.md, section 0). Image folders keep 0: natural images have their energy at every timestep. SD3
# and FLUX keep 0 too: on `builtin:digits-sd3` (seed 1) the noisiest half stopped the run after 75 steps with more of
# the concept left, two P 0.445 and four 0.513 against 0.288 and 0.337 on every timestep (RESULTS.md, section 0b).
NOISE_SURROGATE_MIN_FRACTION = 0.5
# The flow-matching (SD3) flags, and `forget_min_timestep` when 0: a checkpoint records them only when they differ from
# their defaults, so checkpoints written before they existed still resume (a changed value is still refused: absent
# there, set here).
FLOW_MATCHING_FIELDS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")
# Never written into the adapter header (it is published with the adapter).
SECRET_FIELDS = ("hub_token",)


def _flag(default=None, help="", *, type=None, choices=None, action=None, flag=None, positive=False,
          check=None, resume_free=False, default_factory=None):
    """A field that is also a flag of the training script.

    ``positive``: a count (a positive integer); ``check``: ``check_number``'s range; ``resume_free``: the
    value does not change what a training step computes, so a resumed run may change it.
    """
    metadata = {"help": help, "type": type, "choices": choices, "action": action, "flag": flag,
                "positive": positive, "check": check, "resume_free": resume_free}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _derived(help: str):
    """A field filled by ``__post_init__`` from the flags (the prompt lists as read from their files)."""
    return field(init=False, default=None, metadata={"help": help, "derived": True})


POSITIVE = {"low": 0, "low_open": True}
PROBABILITY_OPEN = {"low": 0, "high": 1, "low_open": True, "high_open": True}
BETA = {"low": 0, "high": 1, "high_open": True}


@dataclass
class SelectiveAmnesiaConfig:
    """Everything a forget run is told. ``None`` means "the model's preset" (resolved in ``__post_init__``)."""

    # diffusers' flags
    pretrained_model_name_or_path: str = _flag("builtin:digits", "hub id, pipeline folder or builtin:digits" + D,
                                               resume_free=True)
    revision: str | None = _flag(None, "hub revision of the model" + D, resume_free=True)
    variant: str | None = _flag(None, "weights variant, e.g. fp16" + D, resume_free=True)
    cache_dir: str | None = _flag(None, "hub download cache" + D, resume_free=True)
    output_dir: str = _flag("sa-peft-output", "where the adapter, caches and checkpoints go" + D, resume_free=True)
    seed: int = _flag(0, "seed of data generation, Fisher and training" + D, type=int, check={"low": 0})
    resolution: int | None = _flag(None, "image side; default: the model's native size", type=int, positive=True)
    train_batch_size: int = _flag(4, "surrogate images per step per device; as many replay images" + D, type=int,
                                  positive=True)
    num_train_epochs: int | None = _flag(None, "passes over the surrogate set; ignored when `max_train_steps` is given",
                                         type=int, positive=True, resume_free=True)
    max_train_steps: int | None = _flag(
        None, "step budget; default 1000 unless `num_train_epochs` is given. By default training ends earlier, once "
              "the forgetting signal says the concept is forgotten (`stop_when_forgotten`)",
        type=int, positive=True, resume_free=True)
    gradient_accumulation_steps: int = _flag(1, "micro-batches per optimizer step" + D, type=int, positive=True)
    gradient_checkpointing: bool = _flag(False, "trade compute for UNet activation memory", action="store_true",
                                         resume_free=True)
    learning_rate: float | None = _flag(None, "AdamW learning rate; default 1e-4 (2e-3 on builtin:digits)", type=float,
                                        check=POSITIVE)
    scale_lr: bool = _flag(False, "multiply the lr by batch size, accumulation and processes", action="store_true")
    lr_scheduler: str = _flag("constant", "diffusers scheduler name" + D)
    lr_warmup_steps: int = _flag(0, "warm-up steps" + D, type=int, check={"low": 0})
    snr_gamma: float | None = _flag(None, "Min-SNR-γ loss weighting (5.0 recommended)" + D, type=float, check=POSITIVE)
    noise_offset: float = _flag(0.0, "offset noise scale" + D, type=float, check={"low": 0})
    # Flow-matching models (SD3) only, as diffusers' train_dreambooth_lora_sd3.py (its defaults).
    weighting_scheme: str = _flag("logit_normal", "flow matching (SD3): the σ density and loss weighting, as diffusers' "
                                  "SD3 script (none = uniform)" + D, choices=list(WEIGHTING_SCHEMES))
    logit_mean: float = _flag(0.0, "flow matching: mean of the logit_normal density" + D, type=float, check={})
    logit_std: float = _flag(1.0, "flow matching: std of the logit_normal density" + D, type=float, check=POSITIVE)
    mode_scale: float = _flag(1.29, "flow matching: scale of the mode density" + D, type=float, check={"low": 0})
    use_8bit_adam: bool = _flag(False, "bitsandbytes 8-bit AdamW (states really in 8 bits)", action="store_true")
    allow_tf32: bool = _flag(False, "allow TF32 matmuls on Ampere+ GPUs", action="store_true", resume_free=True)
    adam_beta1: float = _flag(0.9, D, type=float, check=BETA)
    adam_beta2: float = _flag(0.999, D, type=float, check=BETA)
    adam_weight_decay: float = _flag(1e-2, D, type=float, check={"low": 0})
    adam_epsilon: float = _flag(1e-08, D, type=float, check=POSITIVE)
    max_grad_norm: float = _flag(1.0, D, type=float, check={"low": 0})
    mixed_precision: str | None = _flag(None, "default: accelerate config; LoRA weights stay fp32",
                                        choices=["no", "fp16", "bf16"])
    report_to: str = _flag("none", "tensorboard, wandb, all or none" + D, resume_free=True)
    logging_dir: str = _flag("logs", "tracker folder under `output_dir`" + D, resume_free=True)
    checkpointing_steps: int = _flag(500, "save a LoRA-only training checkpoint every N steps" + D, type=int,
                                     positive=True, resume_free=True)
    checkpoints_total_limit: int | None = _flag(None, "keep at most this many checkpoints" + D, type=int, positive=True,
                                                resume_free=True)
    resume_from_checkpoint: str | None = _flag(None, "a checkpoint folder (any name) or 'latest'" + D, resume_free=True)
    resume_with_new_settings: bool = _flag(
        False, "resume although the training settings differ from the checkpoint's (refused by default)",
        action="store_true", resume_free=True)
    enable_xformers_memory_efficient_attention: bool = _flag(False, "xformers attention (GPU); SDPA otherwise",
                                                             action="store_true", resume_free=True)
    rank: int | None = _flag(None, "LoRA rank; default 4 (8 on builtin:digits)", type=int, positive=True)
    validation_prompt: list[str] | None = _flag(  # noqa: RUF009 (a field)
        None, "repeatable; default: the forget prompts and two replay prompts", action="append", resume_free=True)
    num_validation_images: int = _flag(4, "images per validation prompt" + D, type=int, positive=True, resume_free=True)
    validation_steps: int = _flag(100, "validate every N steps (and at start and end)" + D, type=int, positive=True,
                                  resume_free=True)
    push_to_hub: bool = _flag(False, "upload `output_dir` to the hub at the end", action="store_true", resume_free=True)
    hub_model_id: str | None = _flag(None, "repo id; default: the output folder's name", resume_free=True)
    hub_token: str | None = _flag(None, "hub token (prefer `hf auth login`)", resume_free=True)
    # Selective Amnesia's flags
    forget_prompt: list[str] = _flag(help="prompt of a concept to forget (repeatable)", action="append",  # noqa: RUF009 (a field)
                                     default_factory=list, resume_free=True)
    forget_prompts_file: str | None = _flag(None, "text file with one forget prompt per line", resume_free=True)
    surrogate_prompt: list[str] | None = _flag(  # noqa: RUF009 (a field)
        None, "prompt whose images stand in for the concept (e.g. 'a middle aged man'); repeatable: one for all forget "
              "prompts, or one per `forget_prompt`, paired in order", action="append")
    surrogate_data_dir: str | None = _flag(None, "folder of your own stand-in images")
    surrogate_type: str | None = _flag(None, "noise images as the stand-in", choices=["noise", *SURROGATE_TYPES])
    replay_prompts_file: str | None = _flag(
        None, "concepts to keep, one per line; default: a generic list shipped with sa-peft (the other digits on "
              "builtin:digits)", resume_free=True)
    num_surrogate_images: int | None = _flag(None, "surrogate set size; default 64 (256 on builtin:digits)", type=int,
                                             positive=True)
    num_replay_images_per_prompt: int | None = _flag(
        None, "replay images per prompt; default 8 (32 on builtin:digits)", type=int, positive=True)
    generation_guidance_scale: float | None = _flag(
        None, "guidance when generating sets; default 7.5 (3.0 on digits)", type=float, check={"low": 0})
    generation_num_inference_steps: int | None = _flag(
        None, "DDIM steps when generating; default 50 (25 on digits)", type=int, positive=True)
    fisher_path: str | None = _flag(
        None, "Fisher file: reused when present and matching, else computed and cached there; default: in `output_dir`",
        resume_free=True)
    fisher_num_samples: int = _flag(128, "frozen-model samples the Fisher is estimated on" + D, type=int, positive=True)
    fisher_estimator: str = _flag("fast", "reference: all T timesteps per sample; fast: K stratified" + D,
                                  choices=ESTIMATORS)
    fisher_num_timesteps: int = _flag(8, "K of the fast estimator" + D, type=int, positive=True)
    ewc_lambda: float = _flag(5.0, "λ, on a Fisher normalised as `ewc_normalization` says" + D, type=float,
                              check={"low": 0})
    ewc_normalization: str = _flag(
        "mean", "what λ is relative to: 'mean' divides the Fisher by its mean over the adapted weights (λ means the "
                "same for any model size and estimator), 'none' keeps its raw values (the official code's λ = 50 "
                "for SD assumes its own raw scaling)" + D, choices=["mean", "none"])
    ewc_space: str = _flag("lowrank", "EWC penalty space" + D, choices=["full", "lowrank"])
    fisher_rank1_weight: float = _flag(
        0.0, "weight of the rank-1 Fisher penalty c·(μᵀΔθ)² along the mean per-sample gradient μ, added to the "
             "diagonal one under the same λ (0 = off)" + D, type=float, check={"low": 0})
    replay_weight: float | None = _flag(
        None, "γ, weight of the replay loss (default: 30 with `replay_target` distill, 1 with noise)", type=float,
        check={"low": 0})
    replay_target: str = _flag(
        "distill", "replay target: 'distill' = the frozen model's own prediction on the noised replay latent (the "
                   "same UNet with the adapter off), 'noise' = the sampled noise as in the paper" + D,
        choices=REPLAY_TARGETS)
    forget_min_timestep: int | None = _flag(
        None, "the forget term trains on timesteps t ≥ this only (DDPM's t; for SD3/FLUX t = σ·1000, drawn from "
              "`weighting_scheme`'s density restricted to t ≥ this), and the forgetting signal measures the concept "
              "there. Default: half the schedule (500 of 1000) with a noise surrogate (`surrogate_type`) on a UNet, 0 "
              "(every timestep) otherwise", type=int, check={"low": 0})
    # The forgetting signal and the verdict (sa_peft/forgetting.py)
    num_probe_images: int = _flag(
        16, "held-out images per forget prompt (the frozen model's own, and as many surrogate images) for the "
            "forgetting signal" + D, type=int, positive=True)
    num_sample_check_images: int = _flag(
        32, "at the end of a run without a surrogate prompt (noise, image folder), sample this many images of each "
            "forget prompt and have the frozen model judge them against the surrogate images (the verdict's sample "
            "check; it costs (this + 2 × `num_probe_images`) × 16 × (1 + up to 16 replay prompts) denoiser calls). "
            "With a surrogate prompt the samples decide during training instead: at every check once the preference "
            "is at most 0.5, `num_probe_images` samples of each forget prompt, judged the same way. 0 skips both "
            "(the preference alone decides)" + D, type=int, check={"low": 0})
    forgetting_check_steps: int = _flag(25, "measure the forgetting signal every N steps" + D, type=int, positive=True)
    forgetting_threshold: float = _flag(
        DEFAULT_PREFERENCE_THRESHOLD, "a concept is forgotten when its preference (1 = base model, 0 = the "
                                      "reference: part way to a complete swap with a surrogate prompt, equal losses "
                                      "without) is at most this; with a surrogate prompt, once it is at most this or "
                                      "0.5, the adapted model's samples decide (`num_sample_check_images`)" + D,
        type=float, check={})
    retention_bound: float = _flag(
        DEFAULT_RETENTION_BOUND, "largest allowed drift of the adapted model's predictions on held-out replay images "
                                 "from the frozen model's, relative to its denoising error there (retention, 0 for "
                                 "the base model)" + D, type=float, check=POSITIVE)
    stop_when_forgotten: bool = _flag(
        True, "train all `max_train_steps`; by default training ends once every concept is forgotten with retention "
              "inside its bound", action="store_false", flag="--train_full_budget", resume_free=True)
    adaptive_lambda: bool = _flag(
        True, "keep λ at `ewc_lambda`; by default λ starts there and is halved while forgetting stalls with retention "
              "well inside its bound, doubled when retention leaves it", action="store_false", flag="--fixed_lambda")
    require_forgetting: bool = _flag(
        False, "exit with status 1 when the run ends without forgetting (the adapter is still saved)",
        action="store_true", resume_free=True)
    robust_forgetting: bool = _flag(
        False, "adversarial training against the soft-prompt attack (sa-peft attack): every 25 steps a bounded "
               "perturbation of the forget prompt's embedding is fitted to bring the concept back, half of each "
               "surrogate batch is paired with it and, with a surrogate prompt, the frozen model's images of the "
               "concept are trained towards the surrogate under the prompt and under the perturbation. Every 100 steps a "
               "state that forgets under the plain prompt with retention inside its bound is attacked as sa-peft attack "
               "does (200 steps, 16 samples judged by the frozen model); the state the attack served worst ships, and "
               "counts as forgotten only when, attacked afresh for the verdict, at most a tenth of 64 new samples read "
               "as the concept",
               action="store_true")
    lora_alpha: float | None = _flag(None, "LoRA alpha; default: the rank", type=float, check=POSITIVE)
    use_rslora: bool = _flag(False, "rank-stabilised LoRA scaling alpha/sqrt(rank)", action="store_true")
    lora_target: str = _flag("all", f"preset ({', '.join(LORA_TARGET_PRESETS)}) or comma-separated module names" + D)
    train_text_encoder: bool = _flag(
        False, "also train a LoRA on the CLIP text encoders' attention (SD 1.x/2.x: its CLIP; SDXL and SD3: both CLIPs; "
               "FLUX: its CLIP, which gives the pooled embedding), as diffusers' scripts do; T5 stays frozen and off "
               "the device. The EWC penalty covers the denoiser only, so the text encoders are held by replay alone",
        action="store_true")
    output_kohya_format: bool = _flag(False, "also write an A1111/ComfyUI-keyed copy", action="store_true",
                                      resume_free=True)
    classifier: str | None = _flag(
        None, "image classifier for the final evaluation (default on digits: builtin:digits-classifier)",
        resume_free=True)
    num_evaluation_images_per_prompt: int = _flag(50, "samples per prompt in the final evaluation" + D, type=int,
                                                  positive=True, resume_free=True)
    class_text: list[str] | None = _flag(  # noqa: RUF009 (a field)
        None, "with `classifier` clip:<model>: a zero-shot class (repeatable, two or more)", action="append",
        resume_free=True)
    forget_label: list[str] | None = _flag(  # noqa: RUF009 (a field)
        None, "class (text or index) of the forgotten concept for the evaluation (repeatable)", action="append",
        resume_free=True)
    nudenet_threshold: float = _flag(0.6, "with `classifier` nudenet: detection score" + D, type=float,
                                     check=PROBABILITY_OPEN, resume_free=True)
    clip_score_model: str | None = _flag(None, "CLIP model (hub id or folder) for CLIP scores in the evaluation",
                                         resume_free=True)
    evaluation_prompts_file: str | None = _flag(
        None, "prompts to evaluate, one per line; default: the forget and replay prompts", resume_free=True)

    # Filled from the flags by __post_init__
    forget_prompts: list[str] = _derived("the concepts to forget (`forget_prompt` and `forget_prompts_file`)")  # noqa: RUF009 (a field)
    replay_prompts: list[str] = _derived("the concepts to keep (`replay_prompts_file` or the model's preset)")  # noqa: RUF009 (a field)
    validation_prompts: list[str] = _derived("the prompts of the validation grids")  # noqa: RUF009 (a field)
    evaluation_prompts: list[str] | None = _derived("the prompts of the final evaluation (None: forget + replay)")  # noqa: RUF009 (a field)

    def __post_init__(self) -> None:
        self._resolve_presets()
        self._check_values()
        self._check_paths_and_backends()

    # ---- building --------------------------------------------------------------------------------

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SelectiveAmnesiaConfig:
        """The config of parsed flags (``add_arguments``' namespace), presets resolved and checked."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field, named ``--<field>`` unless its metadata names another, with the field's help."""
        # The help texts name fields as `field`, like the errors; --help shows them as the flags.
        flags = {f.name: f.metadata["flag"] or f"--{f.name}" for f in dataclasses.fields(cls) if f.init}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            meta = f.metadata
            kwargs = {"help": with_flags(meta["help"], flags), "dest": f.name}
            if meta["action"] in ("store_true", "store_false"):
                kwargs["action"] = meta["action"]
            else:
                kwargs["default"] = [] if f.default_factory is list else f.default
                for key in ("type", "choices", "action"):
                    if meta[key] is not None:
                        kwargs[key] = meta[key]
            parser.add_argument(meta["flag"] or f"--{f.name}", **kwargs)

    # ---- resolving and checking ------------------------------------------------------------------

    @property
    def on_digits(self) -> bool:
        """A built-in digits model (the UNet one or the SD3-shaped one): the same prompts, classifier and job."""
        return self.pretrained_model_name_or_path in DIGITS_MODELS

    def _default(self, name: str, value) -> None:
        if getattr(self, name) is None:
            setattr(self, name, value)

    def _resolve_presets(self) -> None:
        """The model-dependent defaults: the built-in digits job's, or those for any other model."""
        forget = check_prompts(self.forget_prompt, "forget_prompt") if self.forget_prompt else []
        if self.forget_prompts_file:
            forget += read_prompts_file(self.forget_prompts_file, "forget_prompts_file")
        sources = [x is not None for x in (self.surrogate_prompt, self.surrogate_data_dir, self.surrogate_type)]
        if sum(sources) > 1:
            raise InputError("give only one of `surrogate_prompt`, `surrogate_data_dir` and `surrogate_type`")
        if self.on_digits:
            digits = digits_defaults(forget)
            forget = digits["forget_prompts"]
            replay = (read_prompts_file(self.replay_prompts_file, "replay_prompts_file") if self.replay_prompts_file
                      else digits["replay_prompts"])
            if not any(sources):
                self.surrogate_prompt = digits["surrogate_prompts"]
            presets = {"resolution": digits["resolution"], "generation_guidance_scale": digits["guidance_scale"],
                       "generation_num_inference_steps": digits["num_inference_steps"],
                       "classifier": digits["classifier"], "learning_rate": 2e-3, "rank": 8,
                       "num_surrogate_images": 256, "num_replay_images_per_prompt": 32}
        else:
            if not forget:
                raise InputError("no concept to forget: pass `forget_prompt` (repeatable) or `forget_prompts_file`")
            if not any(sources):
                raise InputError("no surrogate: pass `surrogate_prompt`, `surrogate_data_dir` or `surrogate_type` noise")
            replay = read_prompts_file(self.replay_prompts_file or DEFAULT_REPLAY_PROMPTS_FILE, "replay_prompts_file")
            presets = {"generation_guidance_scale": 7.5, "generation_num_inference_steps": 50, "learning_rate": 1e-4,
                       "rank": 4, "num_surrogate_images": 64, "num_replay_images_per_prompt": 8}
        for name, value in presets.items():
            self._default(name, value)
        self._default("replay_weight", DISTILL_REPLAY_WEIGHT if self.replay_target == "distill" else 1.0)
        if self.surrogate_prompt is not None and len(self.surrogate_prompt) not in (1, len(forget)):
            raise InputError(f"{len(self.surrogate_prompt)} `surrogate_prompt` for {len(forget)} forget prompts: give one "
                             "surrogate for all of them, or one per `forget_prompt` (paired in order)")
        clash = sorted(set(forget) & set(replay))
        if clash:
            raise InputError(f"forget prompt(s) {clash} also appear in the replay prompts; remove them from "
                             "`replay_prompts_file`")
        self.forget_prompts, self.replay_prompts = forget, replay
        self.validation_prompts = check_prompts(self.validation_prompt or (forget + replay[:2]), "validation_prompt")
        self.evaluation_prompts = (read_prompts_file(self.evaluation_prompts_file, "evaluation_prompts_file")
                                   if self.evaluation_prompts_file else None)

    def _check_values(self) -> None:
        """Every number finite and in its range (``--ewc_lambda inf`` saved a NaN adapter), after the presets;
        the scheduler name, which diffusers would refuse only after the sets and the Fisher were made."""
        from diffusers.optimization import SchedulerType

        for f in dataclasses.fields(self):
            if f.metadata.get("positive"):
                check_positive_int(getattr(self, f.name), f.name)
            elif f.metadata.get("check") is not None:
                check_number(getattr(self, f.name), f.name, **f.metadata["check"])
        names = [s.value for s in SchedulerType]
        if self.lr_scheduler not in names:
            raise InputError(f"`lr_scheduler` {self.lr_scheduler!r} is not one of diffusers' schedulers: {', '.join(names)}")

    def _check_paths_and_backends(self) -> None:
        """Files, folders, optional packages and the device, so that none of them fails after the work."""
        import torch

        from .training_setup import check_mixed_precision, require_bitsandbytes, require_xformers

        if self.fisher_path is not None and not self.fisher_path.endswith(".safetensors"):
            raise InputError(f"`fisher_path` {self.fisher_path!r} must be a .safetensors file")
        if self.surrogate_data_dir is not None and not os.path.isdir(self.surrogate_data_dir):
            raise MissingInputError(f"`surrogate_data_dir` {self.surrogate_data_dir!r} is not a folder")
        check_output_apart(self.output_dir, "output_dir", [
            ("pretrained_model_name_or_path", self.pretrained_model_name_or_path),
            ("surrogate_data_dir", self.surrogate_data_dir)])
        check_writable(self.output_dir, "output_dir")
        check_mixed_precision(self.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
        if self.use_8bit_adam:
            require_bitsandbytes()
        if self.enable_xformers_memory_efficient_attention:
            require_xformers()
        checkpoint = self.resume_from_checkpoint
        if checkpoint not in (None, "latest") and not any(
            os.path.isdir(p) for p in (checkpoint, os.path.join(self.output_dir, checkpoint))
        ):
            raise MissingInputError(f"`resume_from_checkpoint` {checkpoint!r}: no such checkpoint folder")
        if self.classifier:
            from .classifier import parse_classifier_spec

            parse_classifier_spec(self.classifier, self.class_text)  # a bad spec fails now, not after training

    # ---- what the run derives from it ------------------------------------------------------------

    def schedule(self, num_surrogate_images: int, num_processes: int) -> tuple[float, int]:
        """``(learning rate, step budget)`` of a run on ``num_processes`` (``--scale_lr``, ``--num_train_epochs``)."""
        learning_rate = self.learning_rate
        if self.scale_lr:
            learning_rate *= self.gradient_accumulation_steps * self.train_batch_size * num_processes
        steps_per_epoch = math.ceil(num_surrogate_images / (self.train_batch_size * num_processes
                                                            * self.gradient_accumulation_steps))
        max_train_steps = self.max_train_steps
        if max_train_steps is None:
            max_train_steps = self.num_train_epochs * steps_per_epoch if self.num_train_epochs else 1000
        return learning_rate, max_train_steps

    def resolve_forget_min_timestep(self, scheduler) -> int:
        """``forget_min_timestep`` for the run's training scheduler, its default filled in (``NOISE_SURROGATE_MIN_FRACTION``
        of the schedule for a noise surrogate on a DDPM model, else 0) and checked against the schedule."""
        T = scheduler.config.num_train_timesteps
        if self.forget_min_timestep is None:
            noisiest = self.surrogate_type and not is_flow_matching(scheduler)  # SD3: measured worse (RESULTS.md, 0b)
            self.forget_min_timestep = int(T * NOISE_SURROGATE_MIN_FRACTION) if noisiest else 0
        elif self.forget_min_timestep >= T:
            raise InputError(f"`forget_min_timestep` must be below the scheduler's num_train_timesteps ({T}), "
                             f"got {self.forget_min_timestep}")
        return self.forget_min_timestep

    def surrogate_description(self) -> str:
        """The surrogate in words (part of the cache keys: kept as it was; published in the card)."""
        if self.surrogate_prompt is not None:
            return ", ".join(f'prompt "{p}"' for p in self.surrogate_prompt)
        if self.surrogate_data_dir is not None:  # the folder's name only: the description is published in the card
            return f"images from the folder {os.path.basename(os.path.normpath(self.surrogate_data_dir))!r}"
        return "uniform noise" if self.surrogate_type in ("noise", "uniform_noise") else "gaussian noise"

    def paired_surrogate_prompts(self) -> list[str | None]:
        """Each forget prompt's surrogate prompt (``None`` for noise or image-folder surrogates)."""
        if self.surrogate_prompt is None:
            return [None] * len(self.forget_prompts)
        prompts = [p.strip() for p in self.surrogate_prompt]
        return prompts * len(self.forget_prompts) if len(prompts) == 1 else prompts

    def training_settings(self, model_key: str) -> dict:
        """What a checkpoint records of the run: every flag that changes a training step, the prompts as read
        from their files, and the base model's weights hash (JSON-normalised, for comparison)."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.init and not f.metadata["resume_free"]
                    and not (f.name in FLOW_MATCHING_FIELDS and getattr(self, f.name) == f.default)
                    and not (f.name == "forget_min_timestep" and not self.forget_min_timestep)}
        settings.update(forget_prompts=self.forget_prompts, replay_prompts=self.replay_prompts, base_model_hash=model_key)
        return json.loads(json.dumps(dict(sorted(settings.items()))))

    def to_dict(self) -> dict:
        """Every field (the secrets left out), JSON-able: what the adapter header records as ``config``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SECRET_FIELDS}


# The flat training-info fields of the adapter header (its ``sa_peft`` entry), in display order, with the labels
# ``sa-peft inspect`` prints; ``training_info`` writes them and the model card quotes them. Labels stay within 20
# characters (inspect aligns the values after the longest).
TRAINING_INFO_FIELDS = (
    ("base_model", "base model"),
    ("base_pipeline", "pipeline"),
    ("forget_prompts", "forgotten concept(s)"),
    ("surrogate", "surrogate"),
    ("surrogate_data_dir", "surrogate folder"),
    ("num_surrogate_images", "surrogate images"),
    ("ewc_lambda", "EWC λ"),
    ("ewc_normalization", "EWC normalisation"),
    ("ewc_space", "EWC space"),
    ("fisher_estimator", "Fisher estimator"),
    ("fisher_num_samples", "Fisher samples"),
    ("fisher_num_timesteps", "Fisher timesteps K"),
    ("fisher_rank1_weight", "rank-1 Fisher weight"),
    ("replay_weight", "replay weight γ"),
    ("num_replay_prompts", "replay prompts"),
    ("num_replay_images_per_prompt", "replay images/prompt"),
    ("robust_forgetting", "robust forgetting"),
    ("rank", "rank"),
    ("lora_alpha", "alpha"),
    ("use_rslora", "rsLoRA"),
    ("lora_target", "targets"),
    ("num_adapted_modules", "adapted modules"),
    ("train_text_encoder", "text encoder LoRA"),
    ("max_train_steps", "steps"),
    ("trained_steps", "steps trained"),
    ("train_batch_size", "batch size"),
    ("replay_target", "replay target"),
    ("forget_min_timestep", "forget timesteps ≥"),
    ("ewc_lambda_final", "EWC λ at the end"),
    ("learning_rate", "learning rate"),
    ("resolution", "resolution"),
    ("seed", "seed"),
    ("sa_peft_version", "sa-peft version"),
)


def training_info(config: SelectiveAmnesiaConfig, **facts) -> dict:
    """The adapter header's ``sa_peft`` entry: ``TRAINING_INFO_FIELDS`` from ``config`` and the run's ``facts``
    (what only the run knows: ``base_pipeline``, ``resolution``, ``learning_rate`` and ``max_train_steps`` as
    scheduled, ``num_replay_images_per_prompt``, ``fisher_num_timesteps`` as used, ``num_adapted_modules``,
    and after training ``trained_steps``, ``ewc_lambda_final``, ``forgetting``), plus the whole ``config``."""
    from . import __version__

    values = {"base_model": config.pretrained_model_name_or_path, "forget_prompts": config.forget_prompts,
              "surrogate": config.surrogate_description(), "num_replay_prompts": len(config.replay_prompts),
              "lora_alpha": config.lora_alpha if config.lora_alpha is not None else config.rank,
              "sa_peft_version": __version__, **facts}
    info = {}
    for key, _ in TRAINING_INFO_FIELDS:
        if key in values:
            info[key] = values[key]
        elif hasattr(config, key):
            info[key] = getattr(config, key)
    unknown = sorted(set(values) - set(info) - {"forgetting"})
    if unknown:
        raise KeyError(f"training_info: {unknown} are not TRAINING_INFO_FIELDS")
    if "forgetting" in values:
        info["forgetting"] = values["forgetting"]
    info["config"] = config.to_dict()
    return info
