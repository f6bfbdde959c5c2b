"""Muon on the hidden matrices (petra's, torch.optim.Muon's update, also under FSDP2), AdamW
on embeddings, head and norms; and Adam-mini (petra's, also under FSDP2)."""

from __future__ import annotations

from ..optim import split_params
from ..optim.adam_mini import AdamMini as AdamMiniOptimizer
from ..optim.chain import OptimizerChain
from ..optim.muon import Muon as MuonOptimizer
from .base import Method


class Muon(Method):
    """Muon orthogonalizes each hidden matrix's momentum (Newton-Schulz, 5 steps) and is
    run with `adjust_lr_fn="match_rms_adamw"` (the update RMS of AdamW, as Moonlight does),
    so that one peak learning rate serves both optimizers. Under FSDP2 each matrix is
    orthogonalized whole on one owner rank (optim/muon.py)."""

    name, optimizer_name = "muon", "Muon + AdamW"
    supports_layerwise = False

    def optimizer(self, model):
        t = self.cfg.train
        hidden, other = split_params(model, self.cfg.method.targets)
        muon = MuonOptimizer(
            [p for _, p in hidden],
            lr=t.lr,
            weight_decay=t.weight_decay,
            adjust_lr_fn="match_rms_adamw",
            moment_dtype=self.moment_dtype,
        )
        return OptimizerChain(muon, self.adamw([p for _, p in other]))


class AdamMini(Method):
    """Adam-mini (Zhang et al. 2024): one second-moment value per block (attention head, output
    neuron) instead of per weight; embeddings and head one per row. petra's own update
    (optim/adam_mini.py), the adam-mini package's partition, also under FSDP2."""

    name, optimizer_name = "adam-mini", "Adam-mini"
    supports_layerwise = False

    def optimizer(self, model):
        t, m = self.cfg.train, self.cfg.model
        return AdamMiniOptimizer(
            [(n, p) for n, p in model.named_parameters() if p.requires_grad],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            eps=t.eps,
            weight_decay=t.weight_decay,
            head_dim=m.hidden_size // m.num_attention_heads,
        )
