"""What a leaker does to a copy before leaking it, shipped so users can measure their own models.

Every attack takes a state dict of torch tensors and returns a new one (the input is not changed).
Each states what its `strength` means. Attacks that change channels (structured pruning,
permutation, rescaling, dummy channels) need to know which layer feeds which; they infer it from
the state dict alone, under one assumption (see `hidden_layers`). Attacks that train
(`finetune`, `transfer`, `overwrite`, `shift`) and `project` need the model code and data: a
`module:factory` and a `module:function(split)` data entry point, the example CNN and Fashion-MNIST
by default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadInput

State = dict[str, torch.Tensor]

BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
QUANT_MODES = ("fp16", "bf16", "int8", "int8-channel")
PRUNE_MODES = ("global", "layer", "random")
SCALE_SUFFIX = "_scale"  # int8 weights are stored as NAME (int8) + NAME_scale (float32)


def _copy(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def _check_fraction(strength: float, what: str) -> None:
    if not 0.0 <= strength < 1.0:
        raise BadInput(f"{what}: strength {strength} must be a fraction in [0, 1)")


def prunable(state: State) -> list[str]:
    """Weights a pruning tool would touch: conv and linear weights, not norms or biases."""
    return [k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2]


# --- unstructured pruning ----------------------------------------------------------------------


def prune_global(state: State, amount: float) -> State:
    """Global unstructured magnitude pruning: zero the `amount` fraction of smallest weights
    across all prunable tensors together (as torch.nn.utils.prune.global_unstructured does)."""
    return prune(state, amount, "global")


def prune(state: State, strength: float, mode: str = "global", seed: int = 0) -> State:
    """Unstructured pruning; `strength` is the fraction of conv/linear weights set to zero.

    `global`: smallest magnitudes over all layers together; `layer`: smallest magnitudes within each
    layer, the same fraction everywhere; `random`: uniformly random weights in each layer.
    """
    _check_fraction(strength, "prune")
    if mode not in PRUNE_MODES:
        raise BadInput(f"prune mode {mode!r}: use one of {', '.join(PRUNE_MODES)}")
    names = prunable(state)
    out = _copy(state)
    if strength == 0.0 or not names:
        return out
    if mode == "global":
        flat = torch.cat([state[n].detach().abs().flatten().float() for n in names])
        k = int(strength * flat.numel())
        if k == 0:
            return out
        threshold = flat.kthvalue(k).values
        for n in names:
            out[n] = torch.where(state[n].abs() <= threshold, torch.zeros_like(state[n]), state[n])
        return out
    g = torch.Generator().manual_seed(seed)
    for n in names:
        w = state[n]
        k = int(strength * w.numel())
        if k == 0:
            continue
        score = torch.rand(w.shape, generator=g) if mode == "random" else w.detach().abs().float()
        drop = score.flatten().topk(k, largest=False).indices
        flat = w.detach().clone().flatten()
        flat[drop] = 0
        out[n] = flat.reshape(w.shape)
    return out


COLLUDE_HOW = ("average", "layers", "majority")


def _layer(name: str) -> str:
    """The module a tensor belongs to: `features.3.weight` -> `features.3`."""
    return name.rpartition(".")[0] or name


def collude(states: list[dict[str, torch.Tensor]], how: str = "average") -> dict[str, torch.Tensor]:
    """Merge several buyers' copies into one model, as colluding buyers would before leaking.

    average: the mean of every floating-point tensor; majority: the per-weight median over the
    copies; layers: each layer (all tensors of one module) taken whole from one copy in turn, so
    a conv and its BatchNorm stay together. Tensors that are not floating point come from the
    first copy.
    """
    if how not in COLLUDE_HOW:
        raise BadInput(f"unknown collusion {how!r} (choose from {', '.join(COLLUDE_HOW)})")
    if len(states) < 2:
        raise BadInput("collusion needs at least two copies")
    first = states[0]
    for i, s in enumerate(states[1:], start=2):
        if s.keys() != first.keys():
            diff = sorted(set(s) ^ set(first))[0]
            raise BadInput(f"copy {i} does not hold the same tensors as copy 1 (e.g. {diff!r})")
        for k, v in s.items():
            if v.shape != first[k].shape:
                raise BadInput(f"copy {i}: tensor {k!r} has shape {tuple(v.shape)}, copy 1 {tuple(first[k].shape)}")
    out: dict[str, torch.Tensor] = {}
    layers = list(dict.fromkeys(_layer(k) for k in first))
    for k, v in first.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif how == "layers":
            out[k] = states[layers.index(_layer(k)) % len(states)][k].clone()
        else:
            stack = torch.stack([s[k].detach().to(torch.float64) for s in states])
            merged = stack.mean(0) if how == "average" else torch.from_numpy(np.median(stack.numpy(), axis=0))
            out[k] = merged.to(v.dtype)
    return out
# --- the layer graph, inferred from a state dict -------------------------------------------------


@dataclass(frozen=True)
class Hidden:
    """A conv layer whose output channels feed exactly one next layer, so they can be changed."""

    weight: str  # conv weight [out, in, kh, kw]
    bias: str | None
    bn: str | None  # BatchNorm prefix ("features.1."), None when the conv has none
    consumer: str  # next layer's weight: conv [o, out, kh, kw] or linear [o, out * block]
    block: int  # input features of the consumer per channel: 1 for a conv, H*W for a flattening linear


def _natural(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]


def hidden_layers(state: State) -> list[Hidden]:
    """Conv layers with BatchNorm and the layer they feed, inferred from the state dict alone.

    Assumption (holds for sequential CNNs such as the example and VGG-like nets, not for residual
    or branching ones): tensor names in natural order (numbers compared as numbers, so `features.11`
    after `features.7`, whatever order the file stores them in) follow the forward order; a conv
    weight is followed by its bias, then by at most one BatchNorm over its channels, and its output
    feeds only the next weight tensor in that order, which is a conv taking exactly that many input
    channels, or a linear layer on the flattened (channel-major) output. Conv layers for which this
    does not fit are left alone.
    """
    names = sorted(state, key=_natural)
    weights = [i for i, n in enumerate(names) if state[n].is_floating_point() and state[n].dim() >= 2]
    found = []
    for pos, i in enumerate(weights[:-1]):
        name, w = names[i], state[names[i]]
        if w.dim() != 4:
            continue
        out_ch = w.shape[0]
        nxt = names[weights[pos + 1]]
        c = state[nxt]
        if c.dim() == 4 and c.shape[1] == out_ch:
            block = 1
        elif c.dim() == 2 and c.shape[1] % out_ch == 0:
            block = c.shape[1] // out_ch
        else:
            continue
        prefix = name.removesuffix("weight")
        bias = prefix + "bias" if prefix + "bias" in state and name.endswith("weight") else None
        bn = None
        for n in names[i + 1 : weights[pos + 1]]:
            if n.endswith("running_mean") and state[n].shape == (out_ch,):
                p = n.removesuffix("running_mean")
                if all(p + s in state for s in BN_PARAMS):
                    bn = p
                    break
        found.append(Hidden(name, bias, bn, nxt, block))
    return found


def _take(state: State, h: Hidden, idx: torch.Tensor) -> None:
    """Keep (and reorder) output channels `idx` of `h`, with its BatchNorm and the consumer's inputs."""
    state[h.weight] = state[h.weight][idx].clone()
    if h.bias:
        state[h.bias] = state[h.bias][idx].clone()
    if h.bn:
        for s in BN_PARAMS:
            state[h.bn + s] = state[h.bn + s][idx].clone()
    c = state[h.consumer]
    if c.dim() == 4:
        state[h.consumer] = c[:, idx].clone()
    else:
        state[h.consumer] = c.reshape(c.shape[0], -1, h.block)[:, idx].reshape(c.shape[0], -1).clone()


def _scale_consumer(state: State, h: Hidden, factor: torch.Tensor) -> None:
    c = state[h.consumer]
    if c.dim() == 4:
        state[h.consumer] = c * factor.reshape(1, -1, 1, 1)
    else:
        state[h.consumer] = (c.reshape(c.shape[0], -1, h.block) * factor.reshape(1, -1, 1)).reshape(c.shape)


def _channels_or_fail(state: State, what: str) -> list[Hidden]:
    layers = hidden_layers(state)
    if not layers:
        raise BadInput(f"{what}: found no conv layer feeding a next layer (see wmtrace.attacks.hidden_layers)")
    return layers


# --- structured pruning --------------------------------------------------------------------------


def prune_filters(state: State, strength: float, layers: list[str] | None = None) -> State:
    """Structured pruning; `strength` is the fraction of output filters removed from each conv layer.

    The filters with the smallest L1 norm go, together with their BatchNorm entries and the matching
    input channels of the next layer, so tensor shapes shrink (the model must be rebuilt with the
    new widths to run). `layers` limits it to those conv weights (default: every hidden conv layer).
    """
    _check_fraction(strength, "prune-filters")
    out = _copy(state)
    for h in _channels_or_fail(state, "prune-filters"):
        if layers is not None and h.weight not in layers:
            continue
        w = out[h.weight]
        keep = w.shape[0] - int(strength * w.shape[0])
        l1 = w.detach().abs().flatten(1).sum(1)
        idx = l1.topk(keep).indices.sort().values
        _take(out, h, idx)
    return out


# --- function-preserving obfuscation -------------------------------------------------------------


def permute(state: State, strength: float = 1.0, seed: int = 0, rescale: bool = True) -> State:
    """Function-preserving obfuscation of every hidden conv layer; outputs stay the same.

    - channels permuted (conv filters, BatchNorm entries, next layer's input channels);
    - rescaled (when `rescale`): each conv filter by a in [1/2, 2] with BatchNorm's running statistics
      adjusted exactly (eps included), and each BatchNorm output by b in [1/2, 2] (gamma and beta) with
      the next layer's inputs scaled by 1/b, positive scaling passing unchanged through ReLU and max-pool;
    - `strength` dummy channels per existing one are added (rounded down; 0.25 adds a quarter):
      random filters whose inputs to the next layer are zero, so they contribute nothing.
    """
    if strength < 0:
        raise BadInput(f"permute: strength {strength} (dummy channels per channel) must be >= 0")
    g = torch.Generator().manual_seed(seed)
    out = _copy(state)
    for h in _channels_or_fail(state, "permute"):
        w = out[h.weight]
        n = w.shape[0]
        extra = int(strength * n)
        if extra:
            _add_dummies(out, h, extra, g)
        n_all = n + extra
        if rescale:
            a = torch.exp((torch.rand(n_all, generator=g) * 2 - 1) * math.log(2.0)).to(w.dtype)
            b = torch.exp((torch.rand(n_all, generator=g) * 2 - 1) * math.log(2.0)).to(w.dtype)
            out[h.weight] = out[h.weight] * a.reshape(-1, *([1] * (w.dim() - 1)))
            if h.bias:
                out[h.bias] = out[h.bias] * a
            if h.bn:
                eps = 1e-5  # BatchNorm's default; var' + eps = a^2 (var + eps) keeps the normalisation exact
                out[h.bn + "running_mean"] = out[h.bn + "running_mean"] * a
                out[h.bn + "running_var"] = a * a * (out[h.bn + "running_var"] + eps) - eps
                out[h.bn + "weight"] = out[h.bn + "weight"] * b
                out[h.bn + "bias"] = out[h.bn + "bias"] * b
                _scale_consumer(out, h, 1.0 / b)
            else:  # no BatchNorm: the conv's own scale passes through ReLU
                _scale_consumer(out, h, 1.0 / a)
        _take(out, h, torch.randperm(n_all, generator=g))
    return out


def _add_dummies(state: State, h: Hidden, k: int, g: torch.Generator) -> None:
    w = state[h.weight]
    std = float(w.float().std())
    state[h.weight] = torch.cat([w, (torch.randn((k, *w.shape[1:]), generator=g) * std).to(w.dtype)])
    if h.bias:
        state[h.bias] = torch.cat([state[h.bias], torch.zeros(k, dtype=w.dtype)])
    if h.bn:
        p = h.bn
        state[p + "weight"] = torch.cat([state[p + "weight"], torch.rand(k, generator=g).to(w.dtype) + 0.5])
        state[p + "bias"] = torch.cat([state[p + "bias"], torch.randn(k, generator=g).to(w.dtype) * 0.1])
        state[p + "running_mean"] = torch.cat([state[p + "running_mean"], torch.zeros(k, dtype=w.dtype)])
        var = float(state[p + "running_var"].mean())
        state[p + "running_var"] = torch.cat([state[p + "running_var"], torch.full((k,), var, dtype=w.dtype)])
    c = state[h.consumer]
    if c.dim() == 4:
        state[h.consumer] = torch.cat([c, torch.zeros(c.shape[0], k, *c.shape[2:], dtype=c.dtype)], 1)
    else:
        state[h.consumer] = torch.cat([c, torch.zeros(c.shape[0], k * h.block, dtype=c.dtype)], 1)


def widths(state: State) -> dict[str, int]:
    """Output channels of every conv layer: what a model factory needs to rebuild a reshaped model."""
    return {k: int(v.shape[0]) for k, v in state.items() if v.is_floating_point() and v.dim() == 4}


# --- precision and noise -------------------------------------------------------------------------


def quantize(state: State, mode: str = "int8-channel") -> State:
    """Lower precision of every conv/linear weight; `mode` is the strength: fp16, bf16 (all float
    tensors cast), int8 (symmetric, one scale per tensor) or int8-channel (one scale per output
    channel). int8 weights are stored as they would ship: NAME as int8 plus NAME_scale (float32),
    which `formats.load_tensors` dequantizes; `dequantize` turns such a state back into floats."""
    if mode in ("fp16", "bf16"):
        dtype = torch.float16 if mode == "fp16" else torch.bfloat16
        return {k: (v.to(dtype) if v.is_floating_point() else v.clone()) for k, v in state.items()}
    if mode not in QUANT_MODES:
        raise BadInput(f"quantize: mode {mode!r}: use one of {', '.join(QUANT_MODES)}")
    out = _copy(state)
    for n in prunable(state):
        w = state[n].detach().float()
        if mode == "int8":
            scale = w.abs().max().clamp_min(1e-12) / 127.0
            scale = scale.reshape(1)
            s = scale
        else:
            scale = w.abs().flatten(1).max(1).values.clamp_min(1e-12) / 127.0
            s = scale.reshape(-1, *([1] * (w.dim() - 1)))
        out[n] = torch.round(w / s).clamp(-127, 127).to(torch.int8)
        out[n + SCALE_SUFFIX] = scale.to(torch.float32)
    return out


def dequantize(state: State) -> State:
    """Float weights back from `quantize`'s int8 + scale storage (other tensors pass through)."""
    out = {}
    for k, v in state.items():
        if k.endswith(SCALE_SUFFIX) and k.removesuffix(SCALE_SUFFIX) in state:
            continue
        scale = state.get(k + SCALE_SUFFIX)
        if scale is not None and v.dtype == torch.int8:
            s = scale.reshape(-1, *([1] * (v.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
            out[k] = v.float() * s
        else:
            out[k] = v.float() if v.is_floating_point() else v.clone()
    return out


def noise(state: State, strength: float, seed: int = 0) -> State:
    """Gaussian noise on every conv/linear weight; `strength` is its std relative to that tensor's std."""
    if strength < 0:
        raise BadInput(f"noise: strength {strength} must be >= 0")
    g = torch.Generator().manual_seed(seed)
    out = _copy(state)
    for n in prunable(state):
        w = state[n]
        out[n] = w + strength * w.float().std() * torch.randn(w.shape, generator=g).to(w.dtype)
    return out


def center(state: State, layers: list[str]) -> State:
    """Subtract the mean row from each named Linear weight (and the mean from its bias).

    Function-preserving where the layer's outputs go (through a residual sum) into a LayerNorm, as
    every transformer block's output projections do: the same value added to every output is what
    LayerNorm subtracts. A mark living in the mean over rows of such a layer is wiped at no cost,
    which is why carrier selection leaves these layers out (`carriers.used_weights`).
    """
    if not layers:
        raise BadInput("center: name the Linear weights to centre (--layer)")
    out = _copy(state)
    for name in layers:
        w = state.get(name)
        if w is None or w.dim() != 2:
            raise BadInput(f"center: {name!r} is not a Linear weight of this model")
        out[name] = w - w.mean(0, keepdim=True)
        bias = name.removesuffix("weight") + "bias"
        if bias in state:
            out[bias] = state[bias] - state[bias].mean()
    return out


def permute_attention(state: State, heads: int, strength: float = 1.0, seed: int = 0) -> State:
    """Function-preserving obfuscation of self-attention (BERT names: `attention.self.query`, `key`,
    `value`, `attention.output.dense`): heads reordered (rows of q, k, v in blocks, the output
    projection's columns with them), the dimensions within each head permuted alike in q and k, and
    each q dimension scaled by a positive factor that k's undoes, so every attention score is
    unchanged. `strength` is the log-std of those factors (0: permutations only)."""
    if strength < 0:
        raise BadInput(f"permute-attention: strength {strength} must be >= 0")
    if heads < 1:
        raise BadInput("permute-attention: give the number of attention heads (--heads)")
    g = torch.Generator().manual_seed(seed)
    out = _copy(state)
    suffix = "query.weight"
    blocks = [k[: -len(suffix)] for k in state if k.endswith("attention.self." + suffix)]
    if not blocks:
        raise BadInput("permute-attention: no BERT-style self-attention (attention.self.query.weight) in this model")
    for p in blocks:
        o = p.removesuffix("self.") + "output.dense.weight"
        d = state[p + suffix].shape[0]
        if d % heads or o not in state:
            raise BadInput(f"permute-attention: {p}query has {d} rows, not {heads} heads of equal size")
        size = d // heads
        order = torch.randperm(heads, generator=g)
        within = torch.stack([torch.randperm(size, generator=g) for _ in range(heads)])
        qk = (order[:, None] * size + within[order]).reshape(-1)
        v = (order[:, None] * size + torch.arange(size)).reshape(-1)
        scale = torch.exp(strength * torch.randn(d, generator=g))
        for name, idx, factor in (("query", qk, scale), ("key", qk, 1.0 / scale), ("value", v, None)):
            for leaf in ("weight", "bias"):
                t = state.get(f"{p}{name}.{leaf}")
                if t is None:
                    continue
                t = t[idx]
                if factor is not None:
                    t = t * (factor[:, None] if leaf == "weight" else factor).to(t.dtype)
                out[f"{p}{name}.{leaf}"] = t
        out[o] = state[o][:, v]
    return out


# --- attacks that train ----------------------------------------------------------------------------


@dataclass
class Trainer:
    """What training attacks need: the model code and the attacker's data."""

    factory: Callable[[], nn.Module]
    data: Callable[[str], torch.utils.data.Dataset]
    batch_size: int = 64
    seed: int = 0

    def model(self, state: State) -> nn.Module:
        m = self.factory()
        try:
            missing, unexpected = m.load_state_dict(state, strict=False)
        except Exception as e:
            raise BadInput(f"the weights do not fit the model ({str(e).splitlines()[0][:160]})") from e
        # Tensors the model lacks (an unused pooler, extra heads) are left out; missing ones are an error.
        bad = [k for k in missing if not k.endswith("num_batches_tracked")]
        if bad:
            raise BadInput(f"the weights do not fit the model ({bad[0]!r})")
        return m

    def batches(self):
        from torch.utils.data import DataLoader

        g = torch.Generator().manual_seed(self.seed)
        ds = self.data("train")
        while True:
            yield from DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g)

    def steps_per_epoch(self) -> int:
        return max(1, len(self.data("train")) // self.batch_size)


def _train(
    model: nn.Module, trainer: Trainer, steps: int, lr: float, extra=None, callback=None,
    labels: torch.Tensor | None = None, params: list[nn.Parameter] | None = None,
) -> nn.Module:
    """Plain SGD (Nesterov momentum 0.9, weight decay 5e-4, as the example master), BatchNorm in
    train mode, constant learning rate; `extra(model)` adds a loss term; `callback(step, model)`
    runs after every step (to snapshot a sweep from one run); `labels` maps the data's labels to
    another task's; `params` limits training to those parameters (default: all)."""
    trained = list(model.parameters()) if params is None else params
    opt = torch.optim.SGD(trained, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    model.train()
    batches = trainer.batches()
    for step in range(steps):
        batch = next(batches)
        x, y = batch[0], batch[1]
        if labels is not None:
            y = labels[y]
        loss = F.cross_entropy(model(x), y)
        if extra is not None:
            loss = loss + extra(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step + 1, model)
    return model.eval()


def _state(model: nn.Module) -> State:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def finetune(state: State, strength: float, trainer: Trainer, lr: float = 0.05, callback=None) -> State:
    """Fine-tuning on the task without any regularizer; `strength` is the number of epochs (fractions
    allowed) at learning rate `lr` (the example master's own peak rate is 0.05)."""
    if strength < 0:
        raise BadInput(f"finetune: strength {strength} (epochs) must be >= 0")
    steps = round(strength * trainer.steps_per_epoch())
    return _state(_train(trainer.model(state), trainer, steps, lr, callback=callback))


def overwrite(
    state: State, strength: float, trainer: Trainer, lam: float = 0.01, bits: int = 256, lr: float = 0.01,
    report: dict | None = None, callback=None,
) -> State:
    """The attacker embeds their own Uchida et al. watermark: own random key and bits, the same
    carrier layers wmtrace would choose, regularizer weight `lam` (0.01 as in the paper) on the raw
    filter mean, trained with the task loss. `strength` is the number of training steps.
    `report['attacker_ber']` receives the bit error rate of the attacker's own mark afterwards."""
    from .carriers import select

    if strength < 0:
        raise BadInput(f"overwrite: strength {strength} (steps) must be >= 0")
    chosen = select(state, bits)
    g = torch.Generator().manual_seed(trainer.seed + 1)
    keys = {c.name: torch.randn(c.bits, c.dim, generator=g) for c in chosen}
    targets = {c.name: torch.randint(0, 2, (c.bits,), generator=g).float() for c in chosen}
    model = trainer.model(state)

    def uchida(m: nn.Module) -> torch.Tensor:
        params = dict(m.named_parameters())
        total = 0.0
        for name, x in keys.items():
            w = params[name]
            logits = x @ w.reshape(w.shape[0], -1).mean(0)
            total = total + F.binary_cross_entropy_with_logits(logits, targets[name], reduction="sum")
        return lam * total

    _train(model, trainer, int(strength), lr, uchida, callback)
    if report is not None:
        params = dict(model.named_parameters())
        wrong = sum(
            int(((x @ params[n].detach().reshape(params[n].shape[0], -1).mean(0) > 0).float() != targets[n]).sum())
            for n, x in keys.items()
        )
        report["attacker_ber"] = wrong / sum(c.bits for c in chosen)
    return _state(model)


def shift(state: State, strength: float, trainer: Trainer, steps: int = 200, lr: float = 0.01, seed: int = 0) -> State:
    """Weight shifting (after Lukas et al.): in every conv layer one random filter is moved by a random
    vector so large that the layer's filter mean (Uchida's statistic) moves by `strength` times the
    layer's weight std per element; then `steps` steps of fine-tuning at `lr` recover accuracy."""
    if strength < 0:
        raise BadInput(f"shift: strength {strength} must be >= 0")
    g = torch.Generator().manual_seed(seed)
    out = _copy(state)
    for n, w in state.items():
        if not (w.is_floating_point() and w.dim() == 4):
            continue
        r = int(torch.randint(0, w.shape[0], (1,), generator=g))
        u = torch.randn(w.shape[1:], generator=g)
        u = u / u.pow(2).mean().sqrt()
        out[n] = w.clone()
        out[n][r] += (strength * w.shape[0] * float(w.float().std()) * u).to(w.dtype)
    return _state(_train(trainer.model(out), trainer, steps, lr))


# Fashion-MNIST's ten classes in four coarse groups: tops (T-shirt, pullover, coat, shirt), one-piece
# and lower garments (trouser, dress), footwear (sandal, sneaker, ankle boot), bags.
COARSE_GROUPS = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)
TRANSFER_TUNE = ("all", "last")


def _head(model: nn.Module) -> str:
    """The classifier to replace: the model's last linear layer."""
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if not names:
        raise BadInput("transfer: the model has no linear layer to replace with a new head")
    return names[-1]


def _new_head(model: nn.Module, classes: int, seed: int) -> str:
    """Replace the last linear layer by a freshly initialised one with `classes` outputs."""
    name = _head(model)
    old = model.get_submodule(name)
    with torch.random.fork_rng():  # a reproducible head without touching the caller's random state
        torch.manual_seed(seed)
        head = nn.Linear(old.in_features, classes, bias=old.bias is not None)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, head)
    return name


def _last_layers(model: nn.Module, head: str) -> list[nn.Parameter]:
    """The new head, the last conv layer and every module after it (its BatchNorm): what a transfer
    learner trains when the early features are kept frozen."""
    modules = list(model.named_modules())
    convs = [i for i, (_, mod) in enumerate(modules) if isinstance(mod, nn.Conv2d)]
    start = convs[-1] if convs else [n for n, _ in modules].index(head)
    return [p for _, mod in modules[start:] for p in mod.parameters(recurse=False)]


def task_accuracy(model: nn.Module, trainer: Trainer, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy on the attacker's new task, over the held-out split."""
    from torch.utils.data import DataLoader

    right = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in DataLoader(trainer.data("test"), batch_size=batch):
            right += int((model(x).argmax(1) == labels[y]).sum())
            total += len(y)
    return right / max(total, 1)


def transfer(
    state: State, strength: float, trainer: Trainer, lr: float = 0.01, tune: str = "all",
    groups: tuple[int, ...] = COARSE_GROUPS, report: dict | None = None, callback=None,
) -> State:
    """Transfer learning: the classifier head is replaced by a new, randomly initialised one for
    another task and the network is fine-tuned on it; `strength` is the number of epochs.

    The new task maps each original label `y` to `groups[y]` (default: Fashion-MNIST's ten classes
    in four coarse groups, `COARSE_GROUPS`; `groups` needs an entry for every label of the data), so
    the head changes shape and the result is a different model. The random head sends large gradients
    into the features at first; once it has learned a task the features already solve, they move
    less than under plain fine-tuning (BENCHMARKS.md). `tune`: `all` trains every layer, `last` only
    the new head and the last conv layer with what follows it. `report['task_accuracy']` receives the new
    task's held-out accuracy (the attacker's cost); `callback(step, model)` runs after every step.
    """
    if strength < 0:
        raise BadInput(f"transfer: strength {strength} (epochs) must be >= 0")
    if tune not in TRANSFER_TUNE:
        raise BadInput(f"transfer: tune {tune!r}: use one of {', '.join(TRANSFER_TUNE)}")
    labels = torch.tensor(groups, dtype=torch.long)
    model = trainer.model(state)
    head = _new_head(model, int(labels.max()) + 1, trainer.seed)
    params = _last_layers(model, head) if tune == "last" else None
    steps = round(strength * trainer.steps_per_epoch())
    _train(model, trainer, steps, lr, callback=callback, labels=labels, params=params)
    if report is not None:
        report["task_accuracy"] = task_accuracy(model, trainer, labels)
    return _state(model)


# --- attacks that need data but no training --------------------------------------------------------


def _inputs(trainer: Trainer, samples: int):
    """The first `samples` training inputs (a tensor, or a dict of tensors): what an attacker runs
    through the copy."""
    from torch.utils.data import DataLoader

    from .batches import split

    return split(next(iter(DataLoader(trainer.data("train"), batch_size=samples))))[0]


def project(state: State, strength: float, trainer: Trainer, part: str = "mean", samples: int = 1024) -> State:
    """Remove from every conv and Linear layer, in the `strength` fraction of input directions the
    attacker's data visits least (eigenvectors of the layer's input second moments on `samples`
    training inputs), either the filter mean's component (`part="mean"`) or every filter's
    (`"filters"`). Needs no master and no knowledge of which layers carry a mark. A mark that is one
    shift shared by all filters (Uchida et al.'s statistic), placed where the data barely looks (as
    activation-aware placement does, for fidelity), is removed by the first at almost no cost; the
    second removes whatever lies in those directions, at the cost of everything the master keeps there."""
    from .carriers import Carrier
    from .embed import input_moments

    if not 0.0 <= strength <= 1.0:
        raise BadInput(f"project: strength {strength} must be a fraction in [0, 1]")
    if part not in ("mean", "filters"):
        raise BadInput(f"project: unknown part {part!r} (mean, filters)")
    out = _copy(state)
    convs = [n for n, v in state.items() if v.is_floating_point() and v.dim() in (2, 4)]  # Linear too
    model = trainer.model(state).eval()
    layers = [Carrier(n, tuple(state[n].shape), 0, 0) for n in convs]
    found = input_moments(model, layers, _inputs(trainer, samples), 0.0)
    for n, moments in zip(convs, found, strict=True):
        if moments is None:
            continue
        w = state[n].detach().double().reshape(state[n].shape[0], -1)
        vecs = torch.from_numpy(np.linalg.eigh(moments)[1][:, : round(strength * w.shape[1])])
        removed = (w.mean(0) @ vecs) @ vecs.T if part == "mean" else (w @ vecs) @ vecs.T
        out[n] = (w - removed).reshape(state[n].shape).to(state[n].dtype)
    return out
