"""The MoE load-balancing loss, with router logits taken from outside the model by forward hooks.

Switch Transformer's loss adapted to Llama 4's sigmoid top-k routing. For one MoE layer, T tokens,
E experts, k experts per token and router logits z (T, E):

    s_te = sigmoid(z_te)                          the affinity Llama 4 scales the expert input by
    p_te = s_te / sum_e' s_te'                    affinities normalised to a distribution per token
    f_e  = 1/(k T) * sum_t [e in topk(z_t)]       fraction of routing slots expert e received
    P_e  = 1/T * sum_t p_te                       mean normalised affinity of expert e
    L    = E * sum_e f_e * P_e

f is a count (no gradient); the gradient through P lowers the affinity of overloaded experts.
Perfectly even routing gives L = 1, all tokens on one expert gives L = E. Softmax routers use
p = softmax(z), which sigmoid scores are not; normalising them (as DeepSeek-V3's balance loss
does) makes P a distribution again. The step adds coef * mean over MoE layers of L.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from models.llama4.model import MoE


def load_balancing_loss(logits_TE: torch.Tensor, top_k: int, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """L above for one layer; valid_T (bool) leaves padding tokens out of both averages."""
    logits_TE = logits_TE.float()
    if valid_T is not None:
        logits_TE = logits_TE[valid_T]
    T, E = logits_TE.shape
    if T == 0:
        return logits_TE.sum() * 0.0
    s_TE = torch.sigmoid(logits_TE)
    p_TE = s_TE / s_TE.sum(-1, keepdim=True)
    chosen_TK = torch.topk(logits_TE, top_k, dim=-1).indices
    counts_E = torch.zeros(E, device=logits_TE.device).index_add_(
        0, chosen_TK.flatten(), torch.ones(chosen_TK.numel(), device=logits_TE.device))
    f_E = counts_E / (top_k * T)
    P_E = p_TE.mean(0)
    return E * (f_E * P_E).sum()


class RouterLogits:
    """Records every MoE router's output during a forward inside `capture()`.

    Only inside capture(): activation checkpointing re-runs the layers (and so these hooks) during
    backward, and those re-runs must not add logits twice.
    """

    def __init__(self, model: nn.Module) -> None:
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]
        self.top_k = self.moes[0].top_k if self.moes else 0
        self._active = False
        self._logits: list[torch.Tensor] = []
        self._handles = [m.router.register_forward_hook(self._hook) for m in self.moes]

    def _hook(self, module, args, output) -> None:
        if self._active:
            if hasattr(output, "full_tensor"):  # a DTensor under tensor parallelism
                output = output.full_tensor()
            self._logits.append(output)

    @contextmanager
    def capture(self):
        self._logits = []
        self._active = True
        try:
            yield self._logits
        finally:
            self._active = False

    def loss(self, logits: list[torch.Tensor], valid_T: torch.Tensor | None = None) -> torch.Tensor | None:
        """Mean of L over the MoE layers of one forward; None for a dense model."""
        if not logits:
            return None
        return torch.stack([load_balancing_loss(z, self.top_k, valid_T) for z in logits]).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
