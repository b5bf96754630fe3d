"""How the LoRA optimizers find an adapter's two factors: by name, the way peft names them.

peft names the factors of one adapter ``<module>.lora_A.<adapter>.weight`` (r x in) and
``<module>.lora_B.<adapter>.weight`` (out x r); swapping that one path component gives the partner's name.
"""


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
