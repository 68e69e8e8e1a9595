"""llada-moe-hf: LLaDA-MoE for the Hugging Face ecosystem.

Importing the package registers LLaDA-MoE with AutoConfig, AutoModel and AutoModelForMaskedLM (model_type
"llada_moe"). AutoModel returns the LM class, as the original release does.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_llada_moe import LLaDAMoEConfig
from .modeling_llada_moe import LLaDAMoEForDiffusionLM, LLaDAMoEModel, LLaDAMoEModelLM, LLaDAMoEPreTrainedModel
from .training_llada_moe import LLaDAMoEDataCollator, masked_diffusion_loss, tokenize_sft_example


__version__ = "0.1.0"

AutoConfig.register(LLaDAMoEConfig.model_type, LLaDAMoEConfig, exist_ok=True)
AutoModel.register(LLaDAMoEConfig, LLaDAMoEForDiffusionLM, exist_ok=True)
AutoModelForMaskedLM.register(LLaDAMoEConfig, LLaDAMoEForDiffusionLM, exist_ok=True)
# Saving from the installed package must copy our .py files and write auto_map (custom code on the Hub).
LLaDAMoEConfig.register_for_auto_class("AutoConfig")
LLaDAMoEForDiffusionLM.register_for_auto_class("AutoModel")

_LAZY = {  # imported on first use: they pull in peft
    "default_lora_config": "lora",
    "get_lora_model": "lora",
    "check_lora_config": "lora",
    "push_lora_adapter_to_hub": "lora",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LLaDAMoEDataCollator",
    "masked_diffusion_loss",
    "tokenize_sft_example",
    "default_lora_config",
    "get_lora_model",
    "check_lora_config",
    "push_lora_adapter_to_hub",
    "LLaDAMoEConfig",
    "LLaDAMoEForDiffusionLM",
    "LLaDAMoEModel",
    "LLaDAMoEModelLM",
    "LLaDAMoEPreTrainedModel",
]
