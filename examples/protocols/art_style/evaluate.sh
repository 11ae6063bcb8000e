#!/usr/bin/env bash
# CLIP zero-shot style classes (the forgotten style vs four others, a photo, a realistic painting), CLIP score, FD/KID.
sa-peft evaluate \
  --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 --lora forget-van-gogh \
  --classifier clip:openai/clip-vit-large-patch14 \
  --class_text "a painting in the style of Vincent van Gogh" --class_text "a painting in the style of Claude Monet" \
  --class_text "a painting in the style of Rembrandt" --class_text "a painting in the style of Pablo Picasso" \
  --class_text "a painting in the style of Katsushika Hokusai" --class_text "a photograph" \
  --class_text "a realistic painting" \
  --prompts_file examples/protocols/art_style/eval_prompts.txt \
  --forget_prompts_file examples/protocols/art_style/forget_eval_prompts.txt \
  --forget_label "a painting in the style of Vincent van Gogh" \
  --num_images_per_prompt 20 --batch_size 8 --guidance_scale 7.5 --num_inference_steps 50 \
  --output_dir forget-van-gogh/evaluation "$@"
