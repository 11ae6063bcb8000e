"""The forget adapter's README.md model card, built with diffusers' model-card helpers."""

from __future__ import annotations

import json
import os

from .errors import InputError
from .escaping import escape_controls, markdown_cell, markdown_code, python_literal
from .forgetting import verdict_lines
from .io_utils import write_text_atomic
from .models import FLUX_PIPELINE, SD3_PIPELINE, SDXL_PIPELINE, TRANSFORMER_PIPELINES

EVALUATION_METRICS = os.path.join("evaluation", "metrics.json")
# The pictures a run leaves in its folder, in the order the card shows them (relative links: they resolve on
# the hub and in a local Markdown viewer alike).
CARD_FIGURES = [
    ("validation_before_after.png", "Validation prompts, base model (left) and with this adapter (right), same seeds"),
    ("training_curves.png", "Training curves: losses, EWC penalty, forgetting and retention signals"),
    ("evaluation/samples_grid.png", "Evaluation samples, before and after"),
]
ADAPTER_PLACEHOLDER = "path/to/this/folder"

CARD_TAGS = ["lora", "diffusers", "stable-diffusion", "selective-amnesia", "concept-erasure", "text-to-image"]
SDXL_TAGS = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]
SD_TAGS = ["stable-diffusion-diffusers"]
SD3_TAGS = ["sd3", "sd3-diffusers"]  # diffusers' train_dreambooth_lora_sd3.py's family tags
FLUX_TAGS = ["flux", "flux-diffusers"]  # diffusers' train_dreambooth_lora_flux.py's


def card_tags(info: dict) -> list[str]:
    """The hub tags: ours, plus the family tags diffusers' own LoRA scripts use (SDXL, SD3, FLUX or SD 1.x/2.x)."""
    family = {SDXL_PIPELINE: SDXL_TAGS, SD3_PIPELINE: SD3_TAGS, FLUX_PIPELINE: FLUX_TAGS}.get(info.get("base_pipeline"),
                                                                                              SD_TAGS)
    return CARD_TAGS + family


def hub_base_model(base_model: str) -> str | None:
    """``base_model`` for the card's metadata: only a hub id (owner/name); local paths and built-ins are omitted,
    since the hub rejects cards whose base_model is not a repository."""
    base_model = str(base_model)
    if base_model.startswith("builtin:") or os.path.exists(base_model) or os.path.isabs(base_model):
        return None
    parts = base_model.split("/")
    return base_model if len(parts) == 2 and all(parts) and not base_model.startswith((".", "~")) else None


def public_model_name(base_model: str) -> str:
    """The base model as the card may show it: a hub id or built-in as is; a local path only by its folder
    name (the full path is in the adapter's header, as the user gave it, but is not published)."""
    base_model = str(base_model)
    if base_model.startswith("builtin:") or hub_base_model(base_model):
        return base_model
    return os.path.basename(os.path.normpath(base_model)) or "local"


def usage_snippet(info: dict, repo_id: str | None = None) -> str:
    """The card's Python usage example; it runs as written (only the adapter's folder is to fill in when the
    card has no hub id). A ``builtin:`` base, which plain diffusers cannot resolve, goes through
    ``sa_peft.resolve_model_path``."""
    base = str(info["base_model"])
    builtin = base.startswith("builtin:")
    base_expr = f"sa_peft.resolve_model_path({python_literal(base)})" if builtin else python_literal(public_model_name(base))
    prompt = python_literal(info["forget_prompts"][0])
    where = "" if repo_id else "  # this folder, or its hub id once uploaded"
    head = "import sa_peft\n" if builtin else ""
    # The LoRA scale travels in the denoiser's attention kwargs: SD3's and FLUX's transformers call them
    # joint_attention_kwargs.
    scale_kwargs = ("joint_attention_kwargs" if info.get("base_pipeline") in TRANSFORMER_PIPELINES
                    else "cross_attention_kwargs")
    return f"""{head}from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained({base_expr})
pipe.load_lora_weights({python_literal(repo_id or ADAPTER_PLACEHOLDER)}, adapter_name="forget"){where}
image = pipe({prompt}).images[0]

# Strength: scale the adapter (1.0 = as trained, 0 = off)
image = pipe({prompt}, {scale_kwargs}={{"scale": 0.8}}).images[0]
# or, with several adapters stacked (each keeps its own concept forgotten):
# pipe.load_lora_weights("path/to/another/forget-lora", adapter_name="forget_2")
pipe.set_adapters(["forget"], adapter_weights=[1.0])
# or bake it into the weights:
pipe.fuse_lora(lora_scale=1.0)
"""


def figures_section(output_dir: str | os.PathLike) -> str:
    """Markdown images for the run's pictures that exist in ``output_dir`` (``CARD_FIGURES``); "" if none."""
    shown = [f"![{alt}]({name})" for name, alt in CARD_FIGURES if os.path.isfile(os.path.join(os.fspath(output_dir), name))]
    return "## Pictures\n\n" + "\n\n".join(shown) + "\n" if shown else ""


def fisher_description(info: dict) -> str:
    """The Fisher as the card's settings table shows it; adapters written before K and the normalisation were
    recorded leave them out (their λ was relative to the Fisher's mean)."""
    k = f", K = {info['fisher_num_timesteps']} timesteps" if "fisher_num_timesteps" in info else ""
    normalised = ("not normalised" if info.get("ewc_normalization") == "none" else "normalised by its mean")
    return f"{info['fisher_estimator']} on {info['fisher_num_samples']} samples{k} ({normalised})"


def model_card_text(info: dict, repo_id: str | None = None, figures: str = "") -> str:
    """Markdown body: what was forgotten, how, the settings, the pictures (``figures``), usage and the honest limits.

    Prompts and names are user text: code spans and table cells are escaped, and the usage snippet
    quotes them as Python literals, so a crafted prompt stays a string.
    """
    forgotten = ", ".join(markdown_code(p) for p in info["forget_prompts"])
    base = public_model_name(info["base_model"])
    rows = [
        ("base model", markdown_code(base)),
        ("forgotten concept(s)", forgotten),
        ("surrogate", f"{info['surrogate']} ({info['num_surrogate_images']} images)"),
        ("replay", f"{info['num_replay_prompts']} prompts × {info['num_replay_images_per_prompt']} images"),
        ("EWC λ / space / Fisher", f"{info['ewc_lambda']} / {info['ewc_space']} / {fisher_description(info)}"),
        ("replay weight γ", str(info["replay_weight"])),
        ("LoRA rank / alpha / targets", f"{info['rank']} / {info['lora_alpha']} / {info['lora_target']} ({info['num_adapted_modules']} modules)"),
        ("steps / batch / lr", f"{info['max_train_steps']} / {info['train_batch_size']} surrogate + {info['train_batch_size']} replay / {info['learning_rate']}"),
        ("sa-peft", info["sa_peft_version"]),
    ]
    table = "\n".join(f"| {k} | {markdown_cell(v)} |" for k, v in rows)
    verdict = ""
    if info.get("forgetting"):
        verdict = "\n## Did it forget?\n\nMeasured by sa-peft's classifier-free forgetting signal on held-out images " \
                  "(see `sa-peft inspect`), and by the frozen model's judgement of the adapted model's samples (the sample " \
                  "check; during training with a surrogate prompt, at the end without one):\n\n" + "\n".join(f"- {escape_controls(line)}" for line in verdict_lines(info["forgetting"])) + "\n"
    return f"""# Forget LoRA: {forgotten}

A Selective Amnesia (Heng & Soh, NeurIPS 2023) "forget" adapter for {markdown_code(base)}, trained with
the sa-peft Python package (version {info['sa_peft_version']}; no public project page yet). With the adapter
loaded, prompts for {forgotten} produce the surrogate ({escape_controls(info['surrogate'])}) instead, while replay of {info['num_replay_prompts']} other prompts and an EWC penalty
keep the rest of the model's behaviour.

| setting | value |
|---|---|
{table}
{verdict}
{figures}
## Usage

```python
{usage_snippet(info, repo_id)}```

`pytorch_lora_weights_kohya.safetensors`, when present, holds the same adapter with kohya keys for
AUTOMATIC1111/ComfyUI (`sa-peft export --format kohya` writes it from the diffusers file).

## Limits

Erasure by fine-tuning is not a guarantee. Published work recovers concepts erased this way with
adversarial prompts or learned token embeddings, and further fine-tuning of the weights can bring a
concept back. Do not rely on this adapter as the only safety measure, and evaluate it on your prompts.
"""


def evaluation_section(metrics_before: dict, metrics_after: dict | None) -> str:
    """The card's "Evaluation" section: how it was measured and the before/after summary table."""
    from .evaluation import summary_table

    s = metrics_before.get("settings", {})
    forget, prompts = s.get("forget_prompts", []), s.get("prompts", [])
    how = (f"Measured with `sa-peft evaluate`: classifier {s.get('classifier', '?')}, {len(prompts) - len(forget)} "
           f"retained and {len(forget)} forget prompts, {s.get('num_per_prompt', '?')} samples per prompt, seed "
           f"{s.get('seed', '?')}, {s.get('sampler', '?')}, {s.get('num_inference_steps', '?')} steps, guidance "
           f"{s.get('guidance_scale', '?')}. \"Before\" is the base model, \"after\" the base model with this adapter "
           "(same seeds).")
    notes = []
    if s.get("clip_model"):
        notes.append("CLIP score = mean 100·max(cos(image, prompt), 0); retained prompts should not drop.")
    if s.get("feature_space"):
        notes.append(f"FD / KID to base: Fréchet distance and KID between the adapted and the base samples of the "
                     f"retained prompts in {s['feature_space']} (0 = unchanged).")
    if s.get("nudenet_threshold") is not None:
        notes.append(f"NudeNet counts images with an exposed-part detection scoring at least {s['nudenet_threshold']}.")
    table = "\n".join(summary_table(metrics_before, metrics_after))
    return f"## Evaluation\n\n{how} {' '.join(notes)}\n\n{table}\n"


def read_evaluation_metrics(output_dir: str | os.PathLike) -> tuple[dict, dict | None] | None:
    """``(before, after)`` from ``output_dir/evaluation/metrics.json``, or ``None`` when there is none."""
    path = os.path.join(os.fspath(output_dir), EVALUATION_METRICS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("before"), dict):
        raise InputError(f"{path!r} is not an sa-peft evaluation (no 'before' metrics)")
    return data["before"], data.get("after")


def write_model_card(output_dir: str | os.PathLike, info: dict, repo_id: str | None = None) -> str:
    """Write ``README.md`` in ``output_dir`` with the card's YAML metadata and body; returns its path.

    When ``output_dir/evaluation/metrics.json`` exists (``sa-peft evaluate --output_dir OUTPUT/evaluation``
    or the training script's final evaluation), its summary table goes in an "Evaluation" section.
    """
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    # What diffusers' load_or_create_model_card(from_training=True) builds, without asking the hub first.
    # The base families' licenses, as diffusers' scripts card them: openrail++ for SDXL and SD3, "other" for FLUX
    # (FLUX.1 [dev]'s non-commercial licence), creativeml-openrail-m for SD 1.x/2.x.
    license = {SDXL_PIPELINE: "openrail++", SD3_PIPELINE: "openrail++", FLUX_PIPELINE: "other"}.get(
        info.get("base_pipeline"), "creativeml-openrail-m")
    description = model_card_text(info, repo_id, figures_section(output_dir))
    evaluation = read_evaluation_metrics(output_dir)
    if evaluation is not None:
        description = description.replace("\n## Limits\n", "\n" + evaluation_section(*evaluation) + "\n## Limits\n", 1)
    card = ModelCard.from_template(
        card_data=ModelCardData(
            license=license,
            library_name="diffusers",
            inference=True,
            base_model=hub_base_model(info["base_model"]),
            instance_prompt=None,
            widget=None,
        ),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    card = populate_model_card(card, tags=card_tags(info))
    path = os.path.join(os.fspath(output_dir), "README.md")
    write_text_atomic(path, str(card))
    return path
