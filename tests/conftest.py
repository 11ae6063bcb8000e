"""Shared fixtures: every model in the suite is the seeded tiny pipeline from ``build_tiny_pipeline``."""

from __future__ import annotations

import pytest
import torch

from sa_peft.fisher import FisherInfo
from sa_peft.lora import iter_adapted_layers, make_lora_config, resolve_lora_targets
from sa_peft.testing.tiny_pipeline import build_tiny_pipeline


@pytest.fixture(scope="module")
def train():
    """The training script as a module (``train.main(argv)`` runs it in-process)."""
    from train_helpers import load_train_module

    return load_train_module()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps a process-wide singleton."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def replay_file(tmp_path_factory):
    """Two replay prompts, as the training script's --replay_prompts_file."""
    path = tmp_path_factory.mktemp("prompts") / "replay.txt"
    path.write_text("a photo of a cat\na photo of a dog\n")
    return path


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline (about 30 ms to build), safe to modify."""
    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """The tiny pipeline saved with ``save_pretrained`` (read-only for tests)."""
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    build_tiny_pipeline().save_pretrained(folder)
    return folder


def add_forget_lora(unet, target="all", rank=2, alpha=None, use_rslora=False, randomize=True, seed=0):
    """Add the forget adapter to ``unet``; with ``randomize`` give A and B random non-zero values."""
    names = resolve_lora_targets(unet, target)
    unet.add_adapter(make_lora_config(names, rank, alpha=alpha, use_rslora=use_rslora))
    if randomize:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in iter_adapted_layers(unet):
                for w in (layer.module.lora_A["default"].weight, layer.module.lora_B["default"].weight):
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    return names


def add_text_encoder_lora(text_encoder, rank, alpha, seed):
    """A random text-encoder LoRA (attention and MLP), as ``--train_text_encoder`` adds; returns (layers, config)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    # peft's own injection, as the training script does (transformers 5.24's add_adapter asks for peft >= 0.22).
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    inject_adapter_in_model(config, text_encoder, "default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in text_encoder.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return get_peft_model_state_dict(text_encoder), config.to_dict()


def random_fisher(unet, module_names, seed=0, extra_modules=()):
    """A positive random diagonal Fisher over ``module_names`` (and ``extra_modules``) of ``unet``."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    diagonal = {}
    for name in [*module_names, *extra_modules]:
        module = modules[name]
        weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
        diagonal[f"{name}.weight"] = torch.rand(weight.shape, generator=gen) + 0.05
    return FisherInfo.from_diagonal(diagonal, {"source": "random"})


def build_tiny_clip(folder, words) -> None:
    """A tiny random CLIPModel with the repo's tokenizer over ``words`` and a CLIPProcessor, saved in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sa_peft.testing.tokenizer import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(folder, words)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
