"""``sa-peft inspect``: what an adapter (or merged checkpoint) file is, from its safetensors header."""

from __future__ import annotations

import argparse
import json
import os

from ..adapter_io import SA_METADATA_KEY, component_configs, load_adapter_file, resolve_adapter_file
from ..config import TRAINING_INFO_FIELDS
from ..errors import InputError
from ..escaping import escape_controls, safe_json
from ..forgetting import verdict_lines
from .common import speaking_flags


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show what a forget adapter file is (base model, concepts, λ, γ, rank, ...)",
        description="Print the training metadata sa-peft stores in an adapter's safetensors header. "
                    "Only .safetensors files are read.",
    )
    parser.add_argument("path", help="adapter .safetensors file, a training output folder, or a merged --single_file")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.set_defaults(func=speaking_flags(run, parser))


def describe(path: str | os.PathLike) -> dict:
    """Everything ``inspect`` knows about ``path``, as a JSON-able dict."""
    from ..ldm_layout import UNET_PREFIX
    from ..merge import SINGLE_FILE_KEY, SINGLE_FILE_LAYOUTS

    file = resolve_adapter_file(path, "sa-peft inspect")
    tensors, header = load_adapter_file(file, "sa-peft inspect")
    info = json.loads(header[SA_METADATA_KEY]) if SA_METADATA_KEY in header else None
    out: dict = {"file": os.path.abspath(file), "size_bytes": os.path.getsize(file)}
    if header.get(SINGLE_FILE_KEY) or any(k.startswith(UNET_PREFIX) for k in tensors):
        layout = SINGLE_FILE_LAYOUTS.get(header.get(SINGLE_FILE_KEY), SINGLE_FILE_LAYOUTS["original-sd"])
        out.update(format=f"merged pipeline checkpoint ({layout})",
                   pipeline=header.get("pipeline_class"), merge=info,
                   components=sorted({k.split(".")[0] for k in tensors}))
        return out
    peft_keys = [k for k in tensors if k.endswith(".lora_A.weight")]
    kohya_keys = [k for k in tensors if k.endswith(".lora_down.weight")]
    if peft_keys:
        out["format"] = "diffusers/peft LoRA (load with pipe.load_lora_weights)"
        downs = {k: tensors[k] for k in peft_keys}
    elif kohya_keys:
        out["format"] = "kohya/A1111 LoRA (lora_unet_… keys; pipe.load_lora_weights reads it too)"
        downs = {k: tensors[k] for k in kohya_keys}
    else:
        raise InputError(f"sa-peft inspect {file!r}: a safetensors file, but neither a LoRA adapter (no lora_A/lora_down "
                         "keys) nor an sa-peft merged checkpoint")
    out["lora_layers"] = len(downs)
    out["ranks"] = sorted({int(v.shape[0]) for v in downs.values()})
    out["dtype"] = str(next(iter(downs.values())).dtype).replace("torch.", "")
    if peft_keys:
        out["components"] = sorted({k.split(".")[0] for k in peft_keys})
    else:
        out["components"] = sorted({k.split("_")[1] for k in kohya_keys})
    configs = component_configs(header)
    if "unet" in configs:
        config = configs["unet"]
        out["adapter_config"] = {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                                 "use_rslora": config.get("use_rslora"),
                                 "target_modules": sorted(config.get("target_modules") or [])}
    out["sa_peft"] = info
    if info and "forgetting" in info:
        out["forgetting"] = info["forgetting"]
    _add_evaluation(out, path, file)
    return out


def _add_evaluation(out: dict, path, file: str) -> None:
    """The before/after summary of ``evaluation/metrics.json`` beside the adapter, if there is one."""
    from ..evaluation import summary_rows
    from ..model_card import EVALUATION_METRICS, read_evaluation_metrics

    folder = os.fspath(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(file))
    metrics = read_evaluation_metrics(folder)
    if metrics is None:
        return
    before, after = metrics
    out["evaluation"] = {
        "file": os.path.abspath(os.path.join(folder, EVALUATION_METRICS)),
        "classifier": before.get("settings", {}).get("classifier"),
        "summary": [{"metric": n, "before": b, "after": a} for n, b, a in summary_rows(before, after)],
    }


def _format(value) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def format_text(summary: dict) -> str:
    lines = [f"file: {summary['file']} ({summary['size_bytes'] / 1e6:.2f} MB)", f"format: {summary['format']}"]
    if "merge" in summary:
        lines.append(f"pipeline: {summary['pipeline']} (A1111/ComfyUI checkpoint; diffusers: from_single_file(path, config=<base>))")
        merge = summary["merge"] or {}
        lines.append(f"base model: {merge.get('base_model', '?')}")
        for lora in merge.get("loras", []):
            concepts = ", ".join((lora.get("sa_peft") or {}).get("forget_prompts", [])) or "?"
            lines.append(f"  merged {lora['file']} × {lora['weight']}: forgets {concepts}")
        return _join(lines)
    lines.append(f"LoRA layers: {summary['lora_layers']} ({', '.join(summary['components'])}), "
                 f"rank {_format(summary['ranks'])}, {summary['dtype']}")
    info = summary.get("sa_peft")
    if info is None:
        lines.append("no sa-peft training metadata: this file was not written by sa-peft (or its header was stripped)")
    else:
        width = max(len(label) for _, label in TRAINING_INFO_FIELDS)
        for key, label in TRAINING_INFO_FIELDS:
            if key in info:
                lines.append(f"{label:<{width}}  {_format(info[key])}")
        if info.get("forgetting"):
            lines.append("forgetting:")
            lines.extend(f"  {line}" for line in verdict_lines(info["forgetting"]))
    config = summary.get("adapter_config")
    if config:
        lines.append(f"adapter config: r={config['r']} alpha={config['lora_alpha']} rsLoRA={config['use_rslora']}")
    evaluation = summary.get("evaluation")
    if evaluation:
        rows = evaluation["summary"]
        lines.append(f"evaluation ({evaluation['file']}, classifier {evaluation['classifier']}):")
        width = max([len(r["metric"]) for r in rows] + [6])
        lines.append(f"  {'metric':<{width}}  {'before':>8}  {'after':>8}")
        lines += [f"  {r['metric']:<{width}}  {r['before']:>8}  {r['after'] or '–':>8}" for r in rows]
    return _join(lines)


def _join(lines: list[str]) -> str:
    """One printed line per entry: header strings cannot add lines or send terminal escape sequences."""
    return "\n".join(escape_controls(line) for line in lines)


def run(args: argparse.Namespace) -> dict:
    summary = describe(args.path)
    print(safe_json(summary) if args.json else format_text(summary))
    return summary
