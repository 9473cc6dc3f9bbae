"""Llama 4 text model; dense Llama is the same code with MoE, NoPE and chunking off.

Tokens travel as one flat batch (T tokens from any number of sequences), each with its
absolute position; attention storage is the caller's `AttentionContext`. Projections are
fused (qkv, gate-up) because one large GEMM beats three small ones on CPU and GPU alike; the
weights module maps them to and from the checkpoint's separate tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import apply_rotary, moe_experts, moe_route, rms_norm, rope_inv_freq, silu_and_mul
from models.llama4.attention import AttentionContext
from models.llama4.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.eps, residual)


class MLP(nn.Module):
    """SwiGLU feed-forward with the gate and up projections fused (gate first)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x_TD):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x_TD)))


class MoE(nn.Module):
    """Top-k sigmoid-routed experts plus an always-on shared expert (Llama 4)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D, I, E = config.hidden_size, config.intermediate_size, config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(D, E, bias=False)
        # Checkpoint layout: (E, D, 2I) and (E, I, D), i.e. x @ w, not nn.Linear's x @ w.T.
        self.experts_gate_up = nn.Parameter(torch.empty(E, D, 2 * I))
        self.experts_down = nn.Parameter(torch.empty(E, I, D))
        self.shared_expert = MLP(D, I)

    def forward(self, x_TD):
        scores_TK, top_ids_TK = moe_route(self.router(x_TD), self.top_k)
        # The shared expert's output is added where the routed outputs are summed back per token.
        return moe_experts(x_TD, top_ids_TK, scores_TK, self.experts_gate_up, self.experts_down,
                           shared_TD=self.shared_expert(x_TD))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads,
                                                  config.num_key_value_heads, config.head_dim)
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q + 2 * kv, bias=False)
        self.o_proj = nn.Linear(q, config.hidden_size, bias=False)
        self.split = (q, kv, kv)
        self.use_rope = config.layer_uses_rope(layer)
        self.interleaved = config.rope_interleaved
        self.qk_norm_eps = config.rms_norm_eps if config.use_qk_norm and self.use_rope else None
        self.temperature = (config.floor_scale, config.attn_scale) if (
            config.attn_temperature_tuning and not self.use_rope) else None
        self.chunk_size = config.layer_chunk_size(layer)
        self.scale = config.scale

    def forward(self, x_TD, positions_T, inv_freq, attn: AttentionContext):
        T = x_TD.shape[0]
        q, k, v = self.qkv_proj(x_TD).split(self.split, dim=-1)
        q_THd = q.view(T, self.n_heads, self.head_dim)
        k_TKd = k.view(T, self.n_kv, self.head_dim)
        v_TKd = v.view(T, self.n_kv, self.head_dim)
        if self.use_rope:
            q_THd, k_TKd = apply_rotary(q_THd, k_TKd, positions_T, inv_freq, self.interleaved)
            if self.qk_norm_eps is not None:  # weightless, after RoPE, RoPE layers only
                q_THd = rms_norm(q_THd, None, self.qk_norm_eps)[0]
                k_TKd = rms_norm(k_TKd, None, self.qk_norm_eps)[0]
        elif self.temperature is not None:
            # NoPE layers sharpen attention with distance: log(floor((p+1)/fs) + 1) * s + 1.
            floor_scale, attn_scale = self.temperature
            t = torch.log1p(torch.floor((positions_T.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q_THd = (q_THd * t[:, None, None]).to(q_THd.dtype)
        o_THd = attn.attend(self.layer, q_THd, k_TKd, v_TKd, self.chunk_size, self.scale)
        return self.o_proj(o_THd.reshape(T, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = (MoE(config) if config.layer_is_moe(layer)
                             else MLP(config.hidden_size, config.mlp_width(layer)))

    def forward(self, x_TD, residual_TD, positions_T, inv_freq, attn):
        h_TD, residual_TD = self.input_layernorm(x_TD, residual_TD)
        h_TD = self.self_attn(h_TD, positions_T, inv_freq, attn)
        h_TD, residual_TD = self.post_attention_layernorm(h_TD, residual_TD)
        return self.feed_forward(h_TD), residual_TD


class Llama4Model(nn.Module):
    """Token ids + absolute positions (+ an AttentionContext) -> final hidden states."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        # fp32 whatever the model's dtype: a plain attribute, so .to(bfloat16) leaves it alone.
        self.inv_freq = self.rope_frequencies(config)
        self.quantization: str | None = None  # set by models.llama4.quantize

    @staticmethod
    def rope_frequencies(config: ModelConfig) -> torch.Tensor:
        return rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor,
                attn: AttentionContext) -> torch.Tensor:
        if self.inv_freq.device != input_ids_T.device:
            self.inv_freq = self.inv_freq.to(input_ids_T.device)
        x_TD = self.embed_tokens(input_ids_T)
        residual_TD = None
        for layer in self.layers:
            x_TD, residual_TD = layer(x_TD, residual_TD, positions_T, self.inv_freq, attn)
        return self.norm(x_TD, residual_TD)[0]

    def compute_logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied to the embedding
            return hidden_TD @ self.embed_tokens.weight.T
        return self.lm_head(hidden_TD)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
