"""``sa-peft attack``: red-team a forget adapter with prompt, inversion, soft-prompt and relearning attacks."""

from __future__ import annotations

import argparse
import os

from ..adapter_io import resolve_adapter_file
from ..attacks import ATTACKS, AttackContext, check_attack_names, run_attacks, write_attack_report
from ..before_after import resolve_evaluation_labels
from ..classifier import CLASSIFIER_SPECS, load_classifier, parse_classifier_spec
from ..data import check_resolution
from ..defaults import DIGIT_PROMPTS
from ..errors import InputError, MissingInputError
from ..merge import check_lora_weights, stack_forget_loras
from ..models import TRAINING_PIPELINES, sampler_description
from ..prompts import check_prompts, read_prompts_file
from ..training_setup import require_bitsandbytes
from .common import add_model_arguments, add_scoring_sampling_arguments, load_pipeline_from_args, speaking_flags


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "attack", help="attack a forget LoRA (reworded prompts, concept inversion, soft prompt, relearning) and "
                       "report how often the forgotten concept comes back",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--lora", action="append", default=[], help="forget LoRA folder or .safetensors file "
                        "(repeatable; stacked)")
    parser.add_argument("--lora_weight", action="append", type=float, default=[],
                        help="scale of each --lora, in order (repeatable; default 1.0 each)")
    parser.add_argument("--forget_prompt", action="append", default=[], help="prompt of the forgotten concept "
                        "(repeatable)")
    parser.add_argument("--forget_label", action="append", default=None,
                        help="forgotten class by name or index (repeatable); default: each forget prompt's last word")
    parser.add_argument("--attack", action="append", default=None,
                        help=f"attack to run (repeatable): {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--classifier", default="builtin:digits-classifier", help=f"what scores samples: {CLASSIFIER_SPECS}")
    parser.add_argument("--class_text", action="append", default=[], help="a zero-shot class of --classifier clip:")
    parser.add_argument("--nudenet_threshold", type=float, default=0.6, help="--classifier nudenet: detection score")
    parser.add_argument("--num_images", type=int, default=50, help="samples per attack prompt / concept")
    add_scoring_sampling_arguments(parser)
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels of every sample (default: the model's native size)")
    parser.add_argument("--attack_prompts_file", default=None,
                        help="prompts attack: more prompts, one per line ({prompt} and {word} are filled in)")
    parser.add_argument("--prompts_num_images", type=int, default=20, help="prompts attack: samples per variant")
    parser.add_argument("--inversion_steps", type=int, default=300, help="inversion: textual-inversion steps")
    parser.add_argument("--inversion_learning_rate", type=float, default=5e-2, help="inversion: Adam learning rate")
    parser.add_argument("--inversion_template", default="{token}", help="inversion: prompt around the learned token")
    parser.add_argument("--attack_num_train_images", type=int, default=64,
                        help="inversion / soft_prompt: base-model images of the concept fitted to")
    parser.add_argument("--soft_prompt_steps", type=int, default=200, help="soft_prompt: optimisation steps")
    parser.add_argument("--soft_prompt_learning_rate", type=float, default=1e-2, help="soft_prompt: Adam learning rate")
    parser.add_argument("--soft_prompt_epsilon", type=float, default=1.0,
                        help="soft_prompt: per-token bound of the perturbation, relative to the token embedding's norm")
    parser.add_argument("--relearn_steps", type=int, default=300, help="relearn: fine-tuning steps")
    parser.add_argument("--relearn_eval_steps", type=int, action="append", default=None,
                        help="relearn: steps at which P(concept) is measured (repeatable; default: 0 and every quarter)")
    parser.add_argument("--relearn_learning_rate", type=float, default=1e-4, help="relearn: AdamW learning rate")
    parser.add_argument("--relearn_batch_size", type=int, default=32, help="relearn: batch size")
    parser.add_argument("--relearn_gradient_checkpointing", action="store_true",
                        help="relearn: recompute activations in the backward pass (memory, as --gradient_checkpointing)")
    parser.add_argument("--relearn_use_8bit_adam", action="store_true",
                        help="relearn: bitsandbytes' 8-bit AdamW (a full FLUX transformer's states in 8 bits)")
    parser.add_argument("--relearn_prompt", action="append", default=None,
                        help="relearn: benign prompt sampled from the base model (repeatable; default on the digits "
                             "classifier: the digits not forgotten)")
    parser.add_argument("--relearn_prompts_file", default=None, help="relearn: benign prompts, one per line")
    parser.add_argument("--relearn_images_per_prompt", type=int, default=32, help="relearn: samples per benign prompt")
    parser.add_argument("--relearn_data_dir", default=None,
                        help="relearn: your own benign images (captions from <name>.txt, else --relearn_data_prompt)")
    parser.add_argument("--relearn_data_prompt", default="", help="relearn: caption of images without a .txt")
    parser.add_argument("--output_dir", required=True, help="where attack.json, report.md and attack_grid.png go")
    parser.set_defaults(func=speaking_flags(run, parser))
    return parser


def _positive(args, *names) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}")


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """Every check that needs no model: ``(attacks, forget prompts, relearn prompts)``; errors name the flag."""
    attacks = check_attack_names(args.attack or list(ATTACKS))
    if not args.forget_prompt:
        raise InputError("no forget prompt: pass --forget_prompt PROMPT (the concept the adapter erased; repeatable)")
    forget = list(dict.fromkeys(check_prompts(args.forget_prompt, "forget_prompt")))
    if not args.lora:
        raise InputError("no adapter to attack: pass --lora PATH (repeatable)")
    for path in args.lora:
        resolve_adapter_file(path, "lora")
    check_lora_weights(args.lora, args.lora_weight)
    if args.resolution is not None:
        _positive(args, "resolution")
    _positive(args, "num_images", "batch_size", "num_inference_steps", "prompts_num_images", "inversion_steps",
              "attack_num_train_images", "soft_prompt_steps", "soft_prompt_epsilon", "relearn_steps",
              "relearn_batch_size", "relearn_images_per_prompt")
    if "{token}" not in args.inversion_template:
        raise InputError(f"--inversion_template {args.inversion_template!r} must contain {{token}}")
    if args.attack_prompts_file:
        read_prompts_file(args.attack_prompts_file, "attack_prompts_file")
    relearn = list(args.relearn_prompt or [])
    if args.relearn_prompts_file:
        relearn += read_prompts_file(args.relearn_prompts_file, "relearn_prompts_file")
    if "relearn" in attacks:
        if args.relearn_data_dir and not os.path.isdir(args.relearn_data_dir):
            raise MissingInputError(f"--relearn_data_dir {args.relearn_data_dir!r} is not a folder")
        if not relearn and not args.relearn_data_dir:
            if args.classifier != "builtin:digits-classifier":
                raise InputError("the relearn attack needs benign data: pass --relearn_prompt, --relearn_prompts_file "
                                 "or --relearn_data_dir")
            relearn = [p for p in DIGIT_PROMPTS if p not in forget]
        if args.relearn_use_8bit_adam:
            require_bitsandbytes("relearn_use_8bit_adam")  # before any model is loaded
        for step in args.relearn_eval_steps or []:
            if not 0 <= step <= args.relearn_steps:
                raise InputError(f"--relearn_eval_steps {step} is outside 0..--relearn_steps ({args.relearn_steps})")
    return attacks, forget, check_prompts(relearn, "relearn_prompt") if relearn else []


def run(args: argparse.Namespace) -> dict:
    """Check the flags, load the classifier, then the pipeline with the stacked LoRAs; attack; write the report."""
    attacks, forget, relearn_prompts = check_args(args)
    parse_classifier_spec(args.classifier, args.class_text)
    classifier = load_classifier(args.classifier, args.class_text, nudenet_threshold=args.nudenet_threshold,
                                 device=args.device)
    _, forgotten, _ = resolve_evaluation_labels(classifier, [], None, forget, args.forget_label)
    # Every family the training script makes forget LoRAs for: the UNets and the SD3/FLUX transformers.
    pipe = load_pipeline_from_args(args, supported=TRAINING_PIPELINES)
    if args.resolution is not None:  # the VAE's factor and the transformer's patches: known once the model is
        check_resolution(pipe, args.resolution)
    names = stack_forget_loras(pipe, args.lora, args.lora_weight)
    pipe.set_progress_bar_config(disable=True)
    ctx = AttackContext(pipe, classifier, forget, forgotten, enable_adapter=pipe.enable_lora,
                        disable_adapter=pipe.disable_lora, num_images=args.num_images, seed=args.seed,
                        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                        batch_size=args.batch_size, resolution=args.resolution)
    extra = read_prompts_file(args.attack_prompts_file, "attack_prompts_file") if args.attack_prompts_file else []
    options = {
        "prompts": {"extra_prompts": extra, "num_images": args.prompts_num_images},
        "inversion": {"steps": args.inversion_steps, "lr": args.inversion_learning_rate,
                      "num_train_images": args.attack_num_train_images, "template": args.inversion_template},
        "soft_prompt": {"steps": args.soft_prompt_steps, "lr": args.soft_prompt_learning_rate,
                        "epsilon": args.soft_prompt_epsilon, "num_train_images": args.attack_num_train_images},
        "relearn": {"adapter_names": names, "prompts": relearn_prompts,
                    "images_per_prompt": args.relearn_images_per_prompt, "data_dir": args.relearn_data_dir,
                    "data_prompt": args.relearn_data_prompt, "steps": args.relearn_steps,
                    "eval_steps": args.relearn_eval_steps, "lr": args.relearn_learning_rate,
                    "batch_size": args.relearn_batch_size,
                    "gradient_checkpointing": args.relearn_gradient_checkpointing,
                    "use_8bit_adam": args.relearn_use_8bit_adam},
    }
    settings = {"base_model": str(args.pretrained_model_name_or_path), "loras": list(args.lora),
                "lora_weights": check_lora_weights(args.lora, args.lora_weight), "forget_prompts": forget,
                "forgotten_labels": [getattr(classifier, "labels", [])[c] for c in forgotten],
                "classifier": args.classifier, "num_images": args.num_images, "seed": args.seed,
                "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                "resolution": args.resolution, "sampler": sampler_description(pipe), "attacks": attacks,
                "options": {k: {o: v for o, v in options[k].items() if o != "adapter_names"} for k in attacks}}
    payload, grids = run_attacks(ctx, attacks, options, settings)
    payload["paths"] = write_attack_report(payload, grids, args.output_dir)
    print(f"wrote {', '.join(payload['paths'].values())}")
    return payload
