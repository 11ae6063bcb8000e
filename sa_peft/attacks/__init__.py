"""Red-team attacks on a forget adapter: does the erased concept come back?

Each attack samples the adapted pipeline (and the base pipeline the same way) and counts the samples a
classifier reads as the forgotten concept (``scoring``). ``prompts``: reworded forget prompts;
``inversion``: a token learned on the base model's images of the concept (concept inversion);
``soft_prompt``: a bounded perturbation of the forget prompt's embedding that lowers the adapted model's
denoising loss on the concept; ``relearn``: the adapter fused and the model fine-tuned on benign data.
"""

from ..errors import InputError
from .context import AttackContext
from .inversion import run_inversion_attack
from .prompt_variants import prompt_variants, run_prompts_attack
from .relearn import fine_tune_unet, run_relearn_attack
from .report import write_attack_report
from .runner import no_attack, run_attacks
from .soft_prompt import run_soft_prompt_attack

# Relearn last: it fuses the adapter into the pipeline and fine-tunes it in place.
ATTACKS = {
    "prompts": run_prompts_attack,
    "inversion": run_inversion_attack,
    "soft_prompt": run_soft_prompt_attack,
    "relearn": run_relearn_attack,
}


def check_attack_names(names) -> list[str]:
    """The requested attacks in run order (relearn last); an unknown name is an error naming ``--attack``."""
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise InputError(f"`attack` {unknown[0]!r} is not an attack; choose from: {', '.join(ATTACKS)}")
    return [n for n in ATTACKS if n in names]


__all__ = ["ATTACKS", "AttackContext", "check_attack_names", "fine_tune_unet", "no_attack", "prompt_variants", "run_attacks",
           "run_inversion_attack", "run_prompts_attack", "run_relearn_attack", "run_soft_prompt_attack",
           "write_attack_report"]
