"""Seeded, offline, tiny Stable Diffusion (1.x/2.x-style), SDXL, SD3 and FLUX pipelines for tests, smoke runs and benchmarks."""

from __future__ import annotations

import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..errors import InputError
from .tokenizer import t5_tokenizer, write_clip_tokenizer

TINY_WORDS = ["a", "photo", "of", "an", "the", "man", "woman", "person", "middle", "aged", "wearing", "clothes", "brad", "pitt", "nudity", "naked", "cat", "dog", "car", "tree", "house", "red", "blue", "green", "painting", "style", "van", "gogh", "handwritten", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "noise"]



def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def _tiny_vae(sample_size: int, latent_channels: int = 4, **extra) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        **extra,
    )


def _tiny_tokenizer():
    with tempfile.TemporaryDirectory() as tmp:
        return write_clip_tokenizer(tmp, TINY_WORDS)


def _tiny_text_config(tokenizer, hidden_size: int = 32, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_pipeline(
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 32,
    num_train_timesteps: int = 1000,
) -> StableDiffusionPipeline:
    """Build a randomly initialised, deterministic ``StableDiffusionPipeline`` of about 0.3 M parameters.

    ``sample_size`` is the image side in pixels; the VAE downsamples by 2, so latents are
    ``sample_size // 2``. ``prediction_type`` is ``"epsilon"`` or ``"v_prediction"`` (SD 2.x style).
    """
    _check_prediction_type(prediction_type)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(sample_size)
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        steps_offset=1,
        clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_SDXL_TIME_EMBED_DIM = 8
TINY_SDXL_PROJECTION_DIM = 32


def build_tiny_sdxl_pipeline(
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 32,
    num_train_timesteps: int = 1000,
    text_encoder_2_hidden_size: int = 32,
) -> StableDiffusionXLPipeline:
    """Build a randomly initialised, deterministic ``StableDiffusionXLPipeline`` shaped like SDXL, only tiny.

    Two CLIP text encoders (the second a ``CLIPTextModelWithProjection`` giving the pooled embedding),
    their penultimate hidden states concatenated as the cross-attention context (32 + 32 = 64), and a
    UNet with ``addition_embed_type="text_time"`` whose added-conditioning input is
    6 · ``addition_time_embed_dim`` (the ``add_time_ids``) + the pooled projection dim. The first block
    has no attention and the transformers use linear projections, as in SDXL. The scheduler is
    ``EulerDiscreteScheduler``, which real SDXL folders ship. The native resolution is ``sample_size``
    (SDXL's 1024 default scaled down); the VAE downsamples by 2.

    ``text_encoder_2_hidden_size`` widens the second encoder (context 32 + it). With both encoders 32 wide,
    diffusers' ``from_single_file`` cannot tell them apart in an original-layout file (it takes any
    ``conditioner.embedders.0`` CLIP of the right width for either encoder); real SDXL's are 768 and 1280 wide.
    """
    _check_prediction_type(prediction_type)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + text_encoder_2_hidden_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_PROJECTION_DIM,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(sample_size)
    tokenizer, tokenizer_2 = _tiny_tokenizer(), _tiny_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_text_config(tokenizer_2, text_encoder_2_hidden_size, projection_dim=TINY_SDXL_PROJECTION_DIM)
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_SD3_T5_DIM = 64


def _tiny_t5(tokenizer, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))


def build_tiny_sd3_pipeline(seed: int = 0, sample_size: int = 32, shift: float = 3.0,
                            text_encoder_2_hidden_size: int = 32) -> StableDiffusion3Pipeline:
    """Build a randomly initialised, deterministic ``StableDiffusion3Pipeline`` shaped like SD3, only tiny.

    As in SD3: an ``SD3Transformer2DModel`` (joint attention blocks over image patches and text tokens,
    patch size 2); a VAE with 16 latent channels and a ``shift_factor`` (latents are (z − shift) · scale);
    two ``CLIPTextModelWithProjection`` encoders whose penultimate states (32 + 32 wide) are zero-padded to the
    T5 width and joined with a ``T5EncoderModel``'s states as the context (77 CLIP + 256 T5 tokens), and whose
    pooled projections (32 + 32) give ``pooled_projections``; a ``FlowMatchEulerDiscreteScheduler`` with SD3's
    shift 3. The native resolution is ``sample_size`` (SD3's 1024 scaled down); the VAE downsamples by 2.
    ``text_encoder_2_hidden_size`` widens the second CLIP (≤ 32: the context is 32 + it, padded to the T5's 64); as
    with SDXL, ``from_single_file`` tells SD3's CLIP-L from CLIP-G by width only (real ones: 768 and 1280).
    """
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size // 2,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TINY_SD3_T5_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TINY_SDXL_PROJECTION_DIM,
        pos_embed_max_size=sample_size // 2,
    )
    torch.manual_seed(seed + 1)
    # SD3's VAE has no quant convs and shifts its latents (SD3: shift 0.0609, scale 1.5305).
    vae = _tiny_vae(sample_size, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305,
                    use_quant_conv=False, use_post_quant_conv=False)
    tokenizer, tokenizer_2 = _tiny_tokenizer(), _tiny_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, projection_dim=TINY_SDXL_PROJECTION_DIM))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_text_config(tokenizer_2, text_encoder_2_hidden_size, projection_dim=TINY_SDXL_PROJECTION_DIM))
    tokenizer_3 = t5_tokenizer(TINY_WORDS)
    torch.manual_seed(seed + 4)
    text_encoder_3 = _tiny_t5(tokenizer_3, TINY_SD3_T5_DIM)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_FLUX_T5_DIM = 32
# FLUX.1's scheduler config: shift 3 and use_dynamic_shifting (the pipeline shifts σ by the image's token count, from
# base_shift at 256 tokens to max_shift at 4096); its training schedule is therefore the unshifted one.
FLUX_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                         "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def build_tiny_flux_pipeline(seed: int = 0, sample_size: int = 32, guidance_embeds: bool = False) -> FluxPipeline:
    """Build a randomly initialised, deterministic ``FluxPipeline`` shaped like FLUX.1, only tiny.

    As in FLUX.1: a ``FluxTransformer2DModel`` with one double-stream block (separate image and text weights, joint
    attention) and one single-stream block, on latents packed into 2×2 patches (16 channels × 4 = 64 inputs), rotary
    position ids over (0, row, column), and a guidance embedding when ``guidance_embeds`` (FLUX.1-dev is guidance
    distilled, FLUX.1-schnell is not); a VAE with 16 latent channels and FLUX's shift and scale (latents are
    (z − 0.1159) · 0.3611); a ``CLIPTextModel`` whose pooled output is ``pooled_projections`` and a
    ``T5EncoderModel`` whose states are the context; ``FlowMatchEulerDiscreteScheduler`` configured as FLUX.1's
    (``FLUX_SCHEDULER_CONFIG``). The VAE downsamples by 2, so ``sample_size`` pixels are ``sample_size // 2`` latents,
    ``(sample_size // 4)²`` image tokens. (``FluxPipeline`` samples at 128 · the VAE's factor unless told a
    ``height``/``width``: pass ``sample_size`` to it, or ``--resolution`` to the training script.)
    """
    if sample_size % 4:
        raise InputError(f"sample_size must be a multiple of 4, got {sample_size} (2×2 patches of 2× downsampled latents)")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=TINY_FLUX_T5_DIM, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(sample_size, latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611,
                    use_quant_conv=False, use_post_quant_conv=False)
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    tokenizer_2 = t5_tokenizer(TINY_WORDS)
    torch.manual_seed(seed + 3)
    text_encoder_2 = _tiny_t5(tokenizer_2, TINY_FLUX_T5_DIM)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
