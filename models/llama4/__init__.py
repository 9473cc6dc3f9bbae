"""Llama 4 text (MoE, iRoPE, chunked attention) and dense Llama: one model class."""

from models.llama4.attention import AttentionContext, DenseAttention, KVCache
from models.llama4.config import ModelConfig
from models.llama4.loader import LoadedModel, load_config, load_model, resolve_dtype, save_pretrained
from models.llama4.model import Llama4Model

__all__ = ["AttentionContext", "DenseAttention", "KVCache", "LoadedModel", "Llama4Model",
           "ModelConfig", "load_config", "load_model", "resolve_dtype", "save_pretrained"]
