"""Training checkpoints without pickles: LoRA and optimizer tensors in safetensors, the rest in JSON.

accelerate's ``save_state`` writes ``optimizer.bin``, ``scheduler.bin`` and ``random_states_0.pkl``,
read back with ``torch.load`` (a payload in the RNG pickle only warned). The loop draws every batch,
noise and timestep from a generator keyed by (seed, step), so a checkpoint needs no RNG state at all.

A checkpoint folder holds:
    pytorch_lora_weights.safetensors   the adapter as the pipeline class's ``save_lora_weights`` writes it,
                                with sa-peft's metadata: ``pipe.load_lora_weights(checkpoint_folder)`` loads it
    lora_<model>.safetensors    the peft state dict of each trained model (unet, text_encoder), for resuming
    optimizer.safetensors       every tensor of the optimizer state, keyed ``<param index>/<name>``
    robust_best_lora.safetensors  with --robust_forgetting, the trained tensors of the state chosen so far to ship
                                (``sa_peft.robust.LeastAttackedState``), when there is one
    training_state.json         the step, the run's training settings, the scheduler and optimizer
                                scalars, the grad scaler (fp16) and the loop's own state
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError
from .io_utils import share_tree, write_json_atomic

CHECKPOINT_FORMAT = "sa-peft-checkpoint/1"
STATE_NAME = "training_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
ROBUST_BEST_NAME = "robust_best_lora.safetensors"


def lora_file_name(model_name: str) -> str:
    return f"lora_{model_name}.safetensors"


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of ``optimizer.state_dict()`` (for safetensors) and everything else (for JSON)."""
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(accelerator, output_dir: str, step: int, models: dict, optimizer, lr_scheduler, settings: dict,
                    loop_state: dict, write_lora=None) -> str:
    """Write ``checkpoint-<step>`` through a hidden folder renamed once complete (a run killed mid-save
    leaves no half checkpoint for ``--resume_from_checkpoint latest``). Only the main process writes.
    ``write_lora(folder)`` writes the loadable LoRA file (``pytorch_lora_weights.safetensors``) there."""
    from peft.utils import get_peft_model_state_dict

    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        for name, model in models.items():
            state = get_peft_model_state_dict(accelerator.unwrap_model(model))
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, lora_file_name(name)))
        if write_lora is not None:
            write_lora(tmp)
        tensors, rest = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, os.path.join(tmp, OPTIMIZER_NAME))
        scaler = getattr(accelerator, "scaler", None)
        write_json_atomic(os.path.join(tmp, STATE_NAME), {
            "format": CHECKPOINT_FORMAT, "step": step, "settings": settings, "optimizer": rest,
            "scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "loop": loop_state,
        })
        share_tree(tmp)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint_state(path: str, parameter: str = "resume_from_checkpoint") -> dict:
    """The JSON state of a checkpoint folder; a clear error for a folder that is not one."""
    file = os.path.join(path, STATE_NAME)
    if not os.path.isfile(file):
        raise InputError(f"`{parameter}` {path!r} is not an sa-peft checkpoint (no {STATE_NAME}; checkpoints written by "
                         "older versions held pickles and are not read); start a new run or pass another folder")
    with open(file, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"`{parameter}` {path!r}: unknown checkpoint format {state.get('format')!r}")
    return state


def settings_differences(saved: dict, current: dict) -> list[str]:
    """``--flag: checkpoint X, now Y`` for every training setting that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_checkpoint(accelerator, path: str, models: dict, optimizer, lr_scheduler) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (safetensors and JSON only); returns its state."""
    from diffusers.training_utils import cast_training_params
    from peft.utils import set_peft_model_state_dict

    state = read_checkpoint_state(path)
    for name, model in models.items():
        model = accelerator.unwrap_model(model)
        file = os.path.join(path, lora_file_name(name))
        if not os.path.isfile(file):
            raise InputError(f"`resume_from_checkpoint` {path!r} has no {lora_file_name(name)}; it is from a run "
                             "that trained other models")
        result = set_peft_model_state_dict(model, load_file(file), adapter_name="default")
        if result.unexpected_keys:
            raise InputError(f"checkpoint {path!r} does not match this LoRA: unexpected {result.unexpected_keys[:3]}")
        cast_training_params(model, dtype=torch.float32)
    optimizer.load_state_dict(_join_optimizer_state(load_file(os.path.join(path, OPTIMIZER_NAME)), state["optimizer"]))
    lr_scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    return state
