"""Run the chosen attacks in order and gather what the report needs."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from .context import AttackContext, best_samples, pooled_rate, summarise
from .sampling import sample


def no_attack(ctx: AttackContext) -> tuple[dict, dict]:
    """The forget prompts as given, on the base and the adapted model: the rates (and mean concept scores) every
    attack is read against."""
    rates, images = {}, {}
    for stage, switch in (("base", ctx.disable_adapter), ("adapted", ctx.enable_adapter)):
        switch()
        parts = []
        for prompt in ctx.forget_prompts:
            x = sample(ctx, ctx.num_images, prompt=prompt)
            parts.append(summarise(ctx, x))
            images.setdefault(stage, x)
        rates[stage] = pooled_rate(parts)
        rates[f"{stage}_mean_concept_score"] = sum(p["mean_concept_score"] for p in parts) / len(parts)
    ctx.enable_adapter()
    return rates, images


def run_attacks(ctx: AttackContext, names: Sequence[str], options: Mapping[str, dict], settings: dict) -> tuple[dict, dict]:
    """``(payload for attack.json, grids)``; ``options[name]`` are the keyword arguments of each attack."""
    from . import ATTACKS

    rates, plain = no_attack(ctx)
    ctx.log(f"no attack: base {rates['base']:.3f}, adapted {rates['adapted']:.3f}")
    attacks, grids = {}, {}
    for name in names:
        start = time.perf_counter()
        result = ATTACKS[name](ctx, **options.get(name, {}))
        result["seconds"] = round(time.perf_counter() - start, 1)
        if name == "relearn":
            result["base_rate"] = rates["base"]
        base_grid, adapted_grid = result.pop("_grid")
        grids[name] = (base_grid if base_grid is not None else best_samples(ctx, plain["base"]), adapted_grid)
        attacks[name] = result
        ctx.log(f"{name}: attack success rate {result['attack_success_rate']:.3f} (base {result['base_rate']:.3f}, "
                f"{result['seconds']:.0f}s)")
    return {"settings": settings, "no_attack": rates, "attacks": attacks}, grids
