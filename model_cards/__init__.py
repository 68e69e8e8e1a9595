"""Model card templates and their renderer (installed as llada_moe_hf.model_cards)."""

from .render import CARD_KINDS, DEFAULT_SAMPLER, build_card, card_metadata, render_card, validate_card


__all__ = ["CARD_KINDS", "DEFAULT_SAMPLER", "build_card", "card_metadata", "render_card", "validate_card"]
