from edgetune.optim.lora_pairs import lora_partner


def test_partner_names_swap_exactly_one_path_component():
    assert lora_partner("base_model.model.layers.3.mlp.down_proj.lora_A.default.weight") == (
        "lora_A",
        "base_model.model.layers.3.mlp.down_proj.lora_B.default.weight",
    )
    assert lora_partner("q_proj.lora_B.custom.weight") == ("lora_B", "q_proj.lora_A.custom.weight")
    assert lora_partner("lora_A.x.weight") == ("lora_A", "lora_B.x.weight")  # a top-level factor


def test_other_parameters_have_no_partner():
    for name in ("model.embed_tokens.weight", "q_proj.lora_Alpha.weight", "my_lora_A.weight", "lora_embedding_A.x"):
        assert lora_partner(name) is None
