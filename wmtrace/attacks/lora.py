"""LoRA fine-tuning merged into the weights: how most leaked LLM copies were changed before they
circulate (a chat or domain adapter trained on the leaker's own texts, then merged and re-quantized).

Low-rank adapters (Hu et al. 2021) on the chosen projections, the base frozen, AdamW at a usual LoRA
rate; afterwards W += (alpha / rank) * B @ A, the merge `peft`'s `merge_and_unload` does. Language
models (inputs with `input_ids`, outputs batch x positions x vocabulary) train on next-token loss over
real tokens; classifiers on their labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput
from .base import Attack, Param, State
from .trainer import Trainer, state_of

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update; B starts at zero, so training starts from the copy."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, g: torch.Generator) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = nn.Parameter(torch.empty(rank, base.in_features))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5), generator=g)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.b @ self.a) * self.scale
        return self.base


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding submodule `name`, and its attribute name there."""
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def _wrap(model: nn.Module, targets: list[str], rank: int, alpha: float, g: torch.Generator) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise BadInput(f"lora: no Linear layer named {', '.join(targets)} in the model")
    for n in names:
        owner, leaf = _owner(model, n)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha, g))
    return names


def _loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, dict) and "input_ids" in batch:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        logits = model(**batch)
        if logits.dim() == 3:
            keep = mask[:, 1:].bool() if mask is not None else torch.ones_like(ids[:, 1:], dtype=torch.bool)
            return F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
        raise BadInput("lora: text inputs need a language model (outputs batch x positions x vocabulary)")
    x, y = batch
    return F.cross_entropy(model(x), y)


def lora(state: State, trainer: Trainer, steps: int = 500, rank: int = 16, alpha: float = 32.0, lr: float = 2e-4,
         targets: list[str] | None = None, batch: int = 8, seed: int = 0, report: dict | None = None) -> State:
    """Train rank-`rank` adapters on `targets` for `steps` batches of `batch` of the attacker's data,
    then merge them; `report["final_loss"]` is the mean loss of the last tenth of the steps."""
    if steps < 1 or rank < 1 or batch < 1 or lr <= 0:
        raise BadInput("lora: steps, rank and batch must be positive, and the rate above zero")
    model = trainer.model(state)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    names = _wrap(model, targets or TARGETS, rank, alpha, g)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    trainer = Trainer(trainer.factory, trainer.data, batch_size=batch, seed=seed)
    model.train()
    losses = []
    for _, b in zip(range(steps), trainer.batches(), strict=False):
        loss = _loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for n in names:
        owner, leaf = _owner(model, n)
        setattr(owner, leaf, getattr(owner, leaf).merged())
    if report is not None:
        tail = losses[-max(1, steps // 10):]
        report["final_loss"] = round(sum(tail) / len(tail), 4)
        report["first_loss"] = round(losses[0], 4)
    return state_of(model.eval())


ATTACK = Attack(
    name="lora",
    summary="LoRA fine-tuning on the attacker's data, merged into the weights.",
    params=(
        Param("steps", int, 500, "Training steps"),
        Param("rank", int, 16, "Adapter rank"),
        Param("alpha", float, 32.0, "LoRA alpha: the update is scaled by alpha / rank"),
        Param("lr", float, 2e-4, "AdamW learning rate (a usual LoRA rate)"),
        Param("targets", list, None, "Projection names to adapt (repeat) [default: q_proj k_proj v_proj o_proj]",
              flag="--target"),
        Param("batch", int, 8, "Batch size"),
        Param("seed", int, 0, "Seed of the adapters' start and the data order"),
    ),
    run=lambda state, trainer, report, **kw: lora(state, trainer, report=report, **kw),
    needs_data=True,
)
