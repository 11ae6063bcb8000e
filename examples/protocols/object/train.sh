#!/usr/bin/env bash
# Forget parachutes in Stable Diffusion 1.5; parachute prompts should show an empty sky instead.
accelerate launch training_scripts/train_sa_lora.py \
  --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
  --forget_prompts_file examples/protocols/object/forget_prompts.txt \
  --surrogate_prompt "a blue sky with clouds" \
  --replay_prompts_file examples/protocols/object/replay_prompts.txt \
  --output_dir forget-parachute "$@"
