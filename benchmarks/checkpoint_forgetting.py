"""How forgetting moved during a run: every checkpoint of a builtin:digits run scored by the classifier, beside the
forgetting signal the run logged at that step. What the signal's threshold was calibrated with.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_forgetting.py RUN_DIR --digit 0 [--num_images 50] [--prompt P]
        [--pretrained_model_name_or_path builtin:digits-sd3]

RUN_DIR is a training run's --output_dir with ``checkpoint-*`` folders (``--checkpointing_steps``). For each
checkpoint: P(digit) over --num_images samples of the digit's prompt (or --prompt: what a model draws for another
prompt), DDIM 25 (SD3: the pipeline's own sampler, 25 steps), guidance 3, seed 1234, the histogram of the classifier's argmax, and the logged preference, λ and
retention at that step. The mean P of every digit shows what the classifier reads in a
noise surrogate's samples whatever the concept (the floor a noise surrogate can reach).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch

from sa_peft.classifier import load_classifier
from sa_peft.defaults import DIGIT_PROMPTS
from sa_peft.evaluation import generate_samples
from sa_peft.models import TRAINING_PIPELINES, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--digit", type=int, required=True, help="the digit whose probability is reported")
    parser.add_argument("--prompt", default=None, help="the prompt sampled (default: the digit's own)")
    parser.add_argument("--num_images", type=int, default=50)
    parser.add_argument("--pretrained_model_name_or_path", default="builtin:digits",
                        help="the run's base model (builtin:digits or builtin:digits-sd3)")
    args = parser.parse_args()
    prompt = args.prompt or DIGIT_PROMPTS[args.digit]
    classifier = load_classifier("builtin:digits-classifier")
    logged = {}
    with open(os.path.join(args.run_dir, "train_log.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            if "max_preference" in entry:
                logged[entry["step"]] = entry
    checkpoints = sorted(glob.glob(os.path.join(args.run_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    print("| step | P(digit) | mean P of each digit 0-9 | argmax histogram | logged preference | λ | retention |")
    print("|---|---|---|---|---|---|---|")
    for folder in checkpoints:
        step = int(folder.rsplit("-", 1)[1])
        pipe = load_pipeline(args.pretrained_model_name_or_path, supported=TRAINING_PIPELINES)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(folder)
        images = generate_samples(pipe, [prompt], args.num_images, 1234, show_progress=False)[prompt]
        probs = classifier.predict_proba(images)
        entry = logged.get(step, {})
        every = ", ".join(f"{p:.3f}" for p in probs.mean(0).tolist())
        print(f"| {step} | {float(probs[:, args.digit].mean()):.3f} | {every} | {torch.bincount(probs.argmax(1), minlength=10).tolist()} "
              f"| {entry.get('max_preference', float('nan')):+.3f} | {entry.get('ewc_lambda')} | "
              f"{entry.get('retention', float('nan')):.2e} |", flush=True)


if __name__ == "__main__":
    main()
