"""``attack.json``, ``report.md`` and ``attack_grid.png`` of an attack run."""

from __future__ import annotations

import os

from ..evaluation import samples_grid
from ..io_utils import atomic_path, write_json_atomic, write_text_atomic


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _detail(name: str, result: dict) -> str:
    if name == "prompts":
        return (f"{result['num_prompts']} prompts; best `{result['best_prompt']}`: "
                f"{_fmt(result['best_prompt_success_rate'])} (base {_fmt(result['best_prompt_base_rate'])})")
    if name == "relearn":
        curve = ", ".join(f"{c['step']}: {_fmt(c['success_rate'])}" for c in result["recovery_curve"])
        return f"recovery curve (step: rate) {curve}; {result['num_benign_images']} benign images"
    if name == "soft_prompt":
        return (f"{result['steps']} steps, ε {result['epsilon']}; the same norms in random directions (control): "
                f"{_fmt(result.get('random_direction_rate'))}")
    if name == "inversion":
        return f"{result['steps']} steps, template `{result['template']}`"
    return ""


def report_markdown(payload: dict) -> str:
    s, none = payload["settings"], payload["no_attack"]
    lines = [
        "# Attacks on the forget adapter", "",
        (f"Forget prompts: {', '.join(f'`{p}`' for p in s['forget_prompts'])}; classifier {s['classifier']}; "
        f"{s['num_images']} samples per prompt or concept, seed {s['seed']}, "
        f"sampler {s.get('sampler', 'DDIM, eta 0')}, "
        f"{s['num_inference_steps']} steps, "
        f"guidance {s['guidance_scale']}. Attack success rate: share of samples the classifier reads as the "
        "forgotten concept (argmax in the forgotten classes; NudeNet: any exposed part). The base rate is the base "
        "model under the same attack (for relearn: the base model with the plain forget prompts)."), "",
        "| attack | success rate (adapted) | base rate | details |", "|---|---|---|---|",
        f"| none (forget prompts as given) | {_fmt(none['adapted'])} | {_fmt(none['base'])} | |",
    ]
    for name, result in payload["attacks"].items():
        detail = _detail(name, result).replace("|", "\\|")
        lines.append(f"| {name} | {_fmt(result['attack_success_rate'])} | {_fmt(result['base_rate'])} | {detail} |")
    lines += ["", ("`attack_grid.png`: per attack, the base model's and the adapted model's samples the classifier "
              "finds most like the concept (relearn: the base model's plain samples beside the fine-tuned model's)."), ""]
    return "\n".join(lines)


def write_attack_report(payload: dict, grids: dict, output_dir: str | os.PathLike) -> dict[str, str]:
    """Write the three files (each atomically); ``grids`` maps an attack to ``(base images, adapted images)``."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"attack": os.path.join(output_dir, "attack.json"), "report": os.path.join(output_dir, "report.md"),
             "grid": os.path.join(output_dir, "attack_grid.png")}
    write_json_atomic(paths["attack"], payload)
    write_text_atomic(paths["report"], report_markdown(payload))
    grid = samples_grid({k: b for k, (b, _) in grids.items()}, {k: a for k, (_, a) in grids.items()},
                        titles=("base model", "adapted model"))
    with atomic_path(paths["grid"]) as tmp:
        grid.save(tmp, format="PNG")
    return paths
