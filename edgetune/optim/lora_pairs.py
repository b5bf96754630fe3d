"""How the LoRA optimizers find an adapter's two factors: by name, the way peft names them.

peft names the factors of one adapter ``<module>.lora_A.<adapter>.weight`` (r x in) and
``<module>.lora_B.<adapter>.weight`` (out x r); swapping that one path component gives the partner's name.
"""

import torch


def lora_partner(name: str) -> tuple[str, str] | None:
    """``(own role, partner's name)`` for a LoRA factor's parameter name, or None for any other parameter.

    >>> lora_partner("model.layers.0.q_proj.lora_A.default.weight")
    ('lora_A', 'model.layers.0.q_proj.lora_B.default.weight')
    """
    parts = name.split(".")
    for own, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
        if own in parts:
            index = parts.index(own)
            return own, ".".join([*parts[:index], other, *parts[index + 1 :]])
    return None


def factor_sides(names: list[str], params: list[torch.Tensor]) -> dict[int, tuple[str, str]]:
    """Map id(param) -> (name, side) for the LoRA factors of one param group, paired by name (AdaFish).

    side is "left" for lora_A (r x in) and "right" for lora_B (out x r). Only 2-D pairs whose ranks agree and that
    both require grad are paired; embedding and conv LoRA, with other names or shapes, are left out.
    """
    by_name = dict(zip(names, params, strict=True))
    sides: dict[int, tuple[str, str]] = {}
    for name, a in by_name.items():
        role = lora_partner(name)
        if role is None or role[0] != "lora_A" or not name.endswith(".weight"):
            continue
        b_name = role[1]
        b = by_name.get(b_name)
        if b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            continue
        if a.requires_grad and b.requires_grad:
            sides[id(a)] = (name, "left")
            sides[id(b)] = (b_name, "right")
    return sides
