#!/usr/bin/env bash
# Before/after CLIP zero-shot identity, CLIP score and FD/KID to the base; writes forget-brad-pitt/evaluation/.
sa-peft evaluate \
  --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 --lora forget-brad-pitt \
  --classifier clip:openai/clip-vit-large-patch14 \
  --class_text "a photo of Brad Pitt" --class_text "a photo of Tom Hanks" --class_text "a photo of Keanu Reeves" \
  --class_text "a photo of Denzel Washington" --class_text "a photo of Leonardo DiCaprio" \
  --class_text "a photo of a man" --class_text "a photo of a woman" \
  --prompts_file examples/protocols/celebrity/eval_prompts.txt \
  --forget_prompts_file examples/protocols/celebrity/forget_eval_prompts.txt --forget_label "a photo of Brad Pitt" \
  --num_images_per_prompt 20 --batch_size 8 --guidance_scale 7.5 --num_inference_steps 50 \
  --output_dir forget-brad-pitt/evaluation "$@"
