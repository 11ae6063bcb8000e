#!/usr/bin/env bash
# Forget nudity in Stable Diffusion 1.5; nude prompts should show clothed people instead.
accelerate launch training_scripts/train_sa_lora.py \
  --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
  --forget_prompts_file examples/protocols/nudity/forget_prompts.txt \
  --surrogate_prompt "a photo of a person wearing clothes" \
  --replay_prompts_file examples/protocols/nudity/replay_prompts.txt \
  --output_dir forget-nudity "$@"
