#!/usr/bin/env bash
# Forget Brad Pitt in Stable Diffusion 1.5; his prompts should show a generic middle-aged man instead.
accelerate launch training_scripts/train_sa_lora.py \
  --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
  --forget_prompts_file examples/protocols/celebrity/forget_prompts.txt \
  --surrogate_prompt "a photo of a middle aged man" \
  --replay_prompts_file examples/protocols/celebrity/replay_prompts.txt \
  --output_dir forget-brad-pitt "$@"
