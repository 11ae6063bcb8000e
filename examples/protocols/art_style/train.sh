#!/usr/bin/env bash
# Forget Van Gogh's style in Stable Diffusion 1.5; his style prompts should give a plain realistic painting.
accelerate launch training_scripts/train_sa_lora.py \
  --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
  --forget_prompts_file examples/protocols/art_style/forget_prompts.txt \
  --surrogate_prompt "a realistic painting" \
  --replay_prompts_file examples/protocols/art_style/replay_prompts.txt \
  --output_dir forget-van-gogh "$@"
