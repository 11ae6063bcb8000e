#!/usr/bin/env bash
# CLIP zero-shot over ten object classes (ESD's Imagenette objects); retained prompts are labelled by their class text.
sa-peft evaluate \
  --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 --lora forget-parachute \
  --classifier clip:openai/clip-vit-large-patch14 \
  --class_text "a photo of a parachute" --class_text "a photo of a church" --class_text "a photo of a golf ball" \
  --class_text "a photo of a chainsaw" --class_text "a photo of a French horn" \
  --class_text "a photo of a garbage truck" --class_text "a photo of a gas pump" \
  --class_text "a photo of a cassette player" --class_text "a photo of a fish" \
  --class_text "a photo of an English springer spaniel" \
  --prompts_file examples/protocols/object/eval_prompts.txt \
  --forget_prompts_file examples/protocols/object/forget_eval_prompts.txt --forget_label "a photo of a parachute" \
  --num_images_per_prompt 20 --batch_size 8 --guidance_scale 7.5 --num_inference_steps 50 \
  --output_dir forget-parachute/evaluation "$@"
