"""Checkpoint conversion and Hub push (installed as llada_moe_hf.conversion)."""
