"""Tiny randomly initialised Hugging Face models, one per architecture family.

They cover graph shapes (pre-/post-LN, RMSNorm, SwiGLU, GQA, Conv1D/Gemm, biases,
patch embeddings); their weights are random, so they never support an accuracy claim.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

ARCHITECTURES = {
    "llama": lambda: T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"]),
    "qwen2": lambda: T.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"]),
    "gpt2": lambda: T.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                                 architectures=["GPT2LMHeadModel"]),
    "opt": lambda: T.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                               word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                               architectures=["OPTForCausalLM"]),
    "mistral": lambda: T.MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                                       architectures=["MistralForCausalLM"]),
    "bert": lambda: T.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, architectures=["BertModel"]),
    "vit": lambda: T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, architectures=["ViTModel"]),
}

# What normalization must find in each: (LayerNormalization, RMSNormalization, Gelu, linears).
EXPECTED = {
    "llama": (0, 5, 0, 15),   # 2 layers x (q,k,v,o,gate,up,down) + lm_head; 2x2 norms + final
    "qwen2": (0, 5, 0, 15),
    "gpt2": (5, 0, 2, 9),     # 2 x (c_attn, c_proj, c_fc, mlp.c_proj) + lm_head; tanh GELU
    "opt": (5, 0, 0, 13),     # 2 x (q,k,v,out,fc1,fc2) + lm_head; ReLU FFN
    "bert": (5, 0, 2, 13),    # embeddings LN + 2 x 2; 2 x 6 linears + pooler
    "vit": (5, 0, 2, 13),     # 2 x 2 + final; patch embedding is a Conv, 2 x 6 + pooler
}


def build(name: str, folder: Path) -> Path:
    """Write the tiny ``name`` model (config + safetensors) into ``folder``."""
    torch.manual_seed(0)
    config = ARCHITECTURES[name]()
    cls = getattr(T, config.architectures[0])
    cls(config).save_pretrained(folder)
    return folder
