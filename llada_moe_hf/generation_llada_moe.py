# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Diffusion generation for LLaDA-MoE (work in progress: see issue 3)."""

from transformers import GenerationConfig


class DiffusionGenerationConfig(GenerationConfig):
    @classmethod
    def from_model_config(cls, model_config):
        raise NotImplementedError


class DiffusionGenerationMixin:
    pass
