"""Turn a copy of the master into a buyer copy: place the codeword, then repair fidelity.

Two stages, read top to bottom:
1. Closed form. Each carrier's filters move by the change whose keyed statistics (`carriers.Secret`)
   have the codeword's signs, all at the same margin, and that changes the layer's outputs on real
   inputs the least (`carriers.embedding_map` with the input second moments from `input_moments`).
   This is where the paper's regularizer would end after a thousand steps, reached in one, and
   on the example it keeps 99.6-99.7% top-1 agreement with the master without any training at
   the default strength 0.2 (BENCHMARKS.md).
2. Repair (optional, `steps` > 0). A short fine-tune pulls the outputs back to the master's
   (distillation on the master's soft outputs; the task loss too if asked for) while a hinge
   form of the embedding regularizer keeps every bit at its margin. Measured on the example it
   no longer helps after activation-aware placement (BENCHMARKS.md), so it is off by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import batches, fidelity
from . import carriers as carriers_mod
from .carriers import Carrier, Secret

OUTPUTS = ("logits", "embedding", "tokens")  # tokens: a language model's next-token logits



@dataclass(frozen=True)
class EmbedConfig:
    # RMS change of each of a carrier's filters (of the filter mean, for a plain-mean carrier), relative
    # to the RMS of its weights. 0.2, not 0.1: at 0.1 one epoch of fine-tuning at the master's peak rate
    # left 8% bit errors on plain-mean copies; signed copies at 0.2 keep 99.7% agreement without
    # training (BENCHMARKS.md).
    strength: float = 0.2
    placement: str = "activation"  # or "minimal-norm": the closed form's metric
    ridge: float = 0.1  # added to the input second moments, relative to their mean eigenvalue
    moment_samples: int = 1024  # training inputs that estimate the second moments, once per issue run
    steps: int = 0  # repair steps per buyer
    batch_size: int = 128
    lr: float = 1e-4
    lam: float = 1.0  # weight of the hinge regularizer during repair
    temperature: float = 2.0
    # Add the task loss when labels exist. Off by default: on the example, distillation alone kept
    # 99.59% top-1 agreement with the master against 99.10% with the task loss added (BENCHMARKS.md).
    use_labels: bool = False
    # What the model returns: class logits (repair distils with KL) or embeddings (1 - cosine).
    output: str = "logits"
    loss: str | None = None  # module:function(output, master_output) -> scalar, replacing the above


def fidelity_loss(cfg: EmbedConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """How far a copy's outputs are from the master's, the quantity repair minimises."""
    if cfg.loss:
        from ...modelio import import_object

        return import_object(cfg.loss)
    if cfg.output == "embedding":
        return lambda out, target: (1.0 - F.cosine_similarity(out.float(), target.float(), dim=-1)).mean()
    t = cfg.temperature
    if cfg.output == "tokens":  # every position's next-token distribution
        return lambda out, target: F.kl_div(
            F.log_softmax(out.flatten(0, -2) / t, 1), F.softmax(target.flatten(0, -2) / t, 1), reduction="batchmean"
        ) * t * t
    return lambda out, target: F.kl_div(
        F.log_softmax(out / t, 1), F.softmax(target / t, 1), reduction="batchmean"
    ) * t * t


def margin(weight: torch.Tensor, carrier: Carrier, strength: float) -> float:
    """Statistic margin (in units of x @ d / sqrt(dim)) whose minimal-norm embedding changes each
    filter (the filter mean, for a plain-mean carrier) by about `strength` times the RMS weight:
    rms(d) = m * sqrt(bits / dim) for random x."""
    rms = float(weight.float().pow(2).mean().sqrt())
    return strength * rms * math.sqrt(carrier.dim / carrier.bits)


def soft_bits(weight: torch.Tensor, master_weight: torch.Tensor, secret: Secret, m: float) -> torch.Tensor:
    """Each bit's statistic of the difference to the master, in margins: +-1 when freshly embedded.
    Differentiable in `weight` (repair's regularizer)."""
    return secret.read((weight - master_weight).reshape(weight.shape[0], -1)) / (math.sqrt(secret.x.shape[1]) * m)


def _patches(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor | None:
    """What one row of the carrier's weight is multiplied with, one row per output position."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        padding = module.padding
        if isinstance(padding, str):  # "valid" or "same" (odd kernels, stride 1)
            padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                            for k, d in zip(module.kernel_size, module.dilation, strict=True))
        p = F.unfold(inputs, module.kernel_size, module.dilation, padding, module.stride)
        return p.transpose(1, 2).reshape(-1, p.shape[1])
    return None


@torch.no_grad()
def input_moments(
    model: nn.Module, carriers: list[Carrier], data: Iterable[batches.Inputs] | batches.Inputs, ridge: float
) -> list[np.ndarray | None]:
    """Per carrier, E[p p^T] over the inputs p its filters see on real data (real tokens only, not
    padding), plus a ridge so that directions the data never visits are not free. None where the
    layer is not a plain Linear or Conv2d (the closed form then falls back to minimal norm).

    `data` is streamed (`modelio.stream`): only the dim x dim sums are kept, so memory does not grow
    with the number of samples or their size."""
    if isinstance(data, (torch.Tensor, dict)):  # inputs already in memory: the same, in chunks
        data = batches.chunks(data)
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    unsupported: set[str] = set()
    hooks = []
    mask: list[torch.Tensor | None] = [None]  # the current chunk's token mask
    for c in carriers:
        owner, _, leaf = c.name.rpartition(".")
        module = modules.get(owner)
        if leaf != "weight" or module is None:
            unsupported.add(c.name)
            continue

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = c.name) -> None:
            x = args[0]
            m = mask[0]
            if isinstance(mod, nn.Linear) and m is not None and x.dim() == 3 and x.shape[:2] == m.shape:
                x = x[m]  # token rows: padded positions never reach the output
            p = _patches(mod, x)
            if p is None or p.shape[1] != math.prod(mod.weight.shape[1:]):
                unsupported.add(name)
                return
            p = p.double()
            sums[name] = sums.get(name, 0) + p.T @ p
            counts[name] = counts.get(name, 0) + p.shape[0]

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for part in data:
            mask[0] = batches.token_mask(part)
            batches.call(model, part)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out: list[np.ndarray | None] = []
    for c in carriers:
        if c.name in unsupported or c.name not in sums:
            out.append(None)
            continue
        moments = (sums[c.name] / counts[c.name]).numpy()
        scale = float(np.trace(moments)) / c.dim
        out.append(moments + ridge * max(scale, 1e-12) * np.eye(c.dim))
    return out


@torch.no_grad()
def distortion(
    model: nn.Module,
    carriers: list[Carrier],
    metrics: list[np.ndarray | None],
    strength: float,
    inputs: batches.Inputs,
    cfg: EmbedConfig,
) -> list[float]:
    """Per candidate carrier, how far a mark there alone moves the model's outputs on `inputs` (the
    fidelity loss), for random bits under a throwaway key: ranks layers before the master's key
    exists. On all-MiniLM-L6-v2 the cost of the same mark differs thirtyfold between layers."""
    from ...coding import keys

    distance = fidelity_loss(cfg)
    params = dict(model.named_parameters())
    was_training = model.training
    model.eval()
    reference = fidelity.outputs(model, inputs)
    key, rng = keys.generate(), np.random.default_rng(0)
    costs = []
    for c, metric in zip(carriers, metrics, strict=True):
        weight = params[c.name]
        saved = weight.detach().clone()
        marked = {c.name: saved}
        bits = rng.integers(0, 2, c.bits).astype(np.float64)
        place(marked, [c], [c.secret(key)], [margin(saved, c, strength)], bits, metrics=[metric])
        weight.copy_(marked[c.name])
        costs.append(float(distance(fidelity.outputs(model, inputs), reference)))
        weight.copy_(saved)
    model.train(was_training)
    return costs


def place(
    state: dict[str, torch.Tensor],
    carriers: list[Carrier],
    secrets: list[Secret],
    margins: list[float],
    bits: np.ndarray,
    metrics: list[np.ndarray | None] | None = None,
    maps: list[carriers_mod.Embedding] | None = None,
) -> None:
    """Stage 1, in place on `state`: each carrier's filters move by the change that sets every bit
    at its margin and moves the layer's outputs least under `metrics` (minimal norm where None).
    `maps` (from `carriers.embedding_map`) saves recomputing them for every buyer."""
    if maps is None:
        metrics = metrics or [None] * len(carriers)
        maps = [carriers_mod.embedding_map(s, mt) for s, mt in zip(secrets, metrics, strict=True)]
    for c, a, m in zip(carriers, maps, margins, strict=True):
        signs = 2.0 * bits[c.start : c.start + c.bits] - 1.0
        d = a.change(signs * m * math.sqrt(c.dim))
        w = state[c.name]
        state[c.name] = w + torch.from_numpy(d).to(w.dtype).reshape(w.shape)


def repair(
    model: nn.Module,
    master: nn.Module,
    data: Iterator,
    carriers: list[Carrier],
    secrets: list[Secret],
    margins: list[float],
    bits: np.ndarray,
    cfg: EmbedConfig,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """Stage 2: distil towards the master under the hinge regularizer; `progress(step, margin)`. Returns the smallest
    normalised bit margin reached (>= 1 means every bit sits at or beyond its target)."""
    params = dict(model.named_parameters())
    ref = dict(master.named_parameters())
    master_weights = [ref[c.name].detach() for c in carriers]
    signs = [torch.from_numpy(2.0 * bits[c.start : c.start + c.bits] - 1.0).float() for c in carriers]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # BatchNorm keeps the master's running statistics: a few small batches would only add noise.
    model.eval()
    master.eval()
    distance = fidelity_loss(cfg)
    for step in range(cfg.steps):
        inputs, labels = batches.split(next(data))
        with torch.no_grad():
            target = batches.call(master, inputs)
        out = batches.call(model, inputs)
        loss = distance(out, target)
        if labels is not None and cfg.use_labels and cfg.output == "logits":
            loss = loss + F.cross_entropy(out, labels)
        held = [  # each bit's projection times its sign, in margins: >= 1 is on target
            s * soft_bits(params[c.name], w0, k, m)
            for c, w0, k, m, s in zip(carriers, master_weights, secrets, margins, signs, strict=True)
        ]
        hinge = sum(F.relu(1.0 - h).mean() for h in held)
        loss = loss + cfg.lam * hinge
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, float(min(h.min() for h in held).detach()))
    return min_margin(model, master, carriers, secrets, margins, bits)


@torch.no_grad()
def min_margin(
    model: nn.Module,
    master: nn.Module,
    carriers: list[Carrier],
    secrets: list[Secret],
    margins: list[float],
    bits: np.ndarray,
) -> float:
    params, ref = dict(model.named_parameters()), dict(master.named_parameters())
    worst = math.inf
    for c, k, m in zip(carriers, secrets, margins, strict=True):
        s = torch.from_numpy(2.0 * bits[c.start : c.start + c.bits] - 1.0).float()
        z = soft_bits(params[c.name].float(), ref[c.name].float(), k, m)
        worst = min(worst, float((s * z).min()))
    return worst
