"""llada-moe-hf: LLaDA-MoE for the Hugging Face ecosystem.

Importing the package registers LLaDA-MoE with AutoConfig, AutoModel and AutoModelForMaskedLM (model_type
"llada_moe"). AutoModel returns the LM class, as the original release does.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_llada_moe import LLaDAMoEConfig
from .modeling_llada_moe import LLaDAMoEForDiffusionLM, LLaDAMoEModel, LLaDAMoEModelLM, LLaDAMoEPreTrainedModel


__version__ = "0.1.0"

AutoConfig.register(LLaDAMoEConfig.model_type, LLaDAMoEConfig, exist_ok=True)
AutoModel.register(LLaDAMoEConfig, LLaDAMoEForDiffusionLM, exist_ok=True)
AutoModelForMaskedLM.register(LLaDAMoEConfig, LLaDAMoEForDiffusionLM, exist_ok=True)
# Saving from the installed package must copy our .py files and write auto_map (custom code on the Hub).
LLaDAMoEConfig.register_for_auto_class("AutoConfig")
LLaDAMoEForDiffusionLM.register_for_auto_class("AutoModel")

__all__ = [
    "LLaDAMoEConfig",
    "LLaDAMoEForDiffusionLM",
    "LLaDAMoEModel",
    "LLaDAMoEModelLM",
    "LLaDAMoEPreTrainedModel",
]
