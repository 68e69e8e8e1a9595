"""Model card templates and their renderer (installed as llada_moe_hf.model_cards)."""
