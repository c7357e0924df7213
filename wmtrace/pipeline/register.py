"""`init`: register a master. Check everything, prepare every scheme, then write under the lock.

Nothing is written before the weights load, the model builds and runs on the data, and each scheme
has prepared its configuration; then the master's files, its key and its row are written while the
registry lock is held (`_register`), in an order that no interruption can turn into a lost key.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from .. import failpoint, fidelity, formats, modelio, schemes
from ..coding import codes, keys
from ..errors import BadArgument, BadInput
from ..registry import Master, MasterConfig, Registry
from ..schemes import blackbox, whitebox
from ..schemes.whitebox import calibrate, embed

EXAMPLE_MASTER = "fashion-cnn"
EXAMPLE_FACTORY = "wmtrace.example:build"
EXAMPLE_DATA = "wmtrace.example:dataset"
# The ceiling of the bundled example's strength search, twice the library default: its copies still
# meet the 99% target at 0.4 (99.07-99.19%, 3 copies), and the mark outlasts the fine-tuning that
# erased it at 0.2 within the 5-point budget (AdamW at lr 0.01, decay 0.1, augmentation, 2 epochs,
# 4.99 points: the leaker's score 4.34 at 0.2, 7.09 at 0.4, the bound needs 5.46; BENCHMARKS.md).
EXAMPLE_STRENGTH = 0.4
# Training inputs on which candidate carrier layers are ranked by what a mark there costs.
COST_SAMPLES = 64
# Largest input (values per sample) for which `init` adds the black-box scheme by default: 64 x 64 RGB.
BLACKBOX_MAX_INPUT = 64 * 64 * 3


def check_name(name: str) -> None:
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith("."):
        raise BadInput(f"master name {name!r}: use letters, digits, '-', '_' and '.'")


def init(
    reg: Registry,
    name: str,
    weights: str | os.PathLike,
    factory: str,
    data: str | None = None,
    carriers: list[str] | None = None,
    bits: int = 256,
    layers: int | None = None,
    strength: float = embed.EmbedConfig.strength,
    steps: int = embed.EmbedConfig.steps,
    eval_samples: int | None = None,
    placement: str = embed.EmbedConfig.placement,
    output: str = embed.EmbedConfig.output,
    loss: str | None = None,
    scheme_names: list[str] | None = None,
    bb_margin: float | None = None,
    bb_tilt: float | None = None,
    fidelity_target: float | None = None,
    progress: Callable[[object], None] | None = None,
    image_psnr: float | None = None,
    image_layer: str | None = None,
    image_mirror: bool = True,
) -> Master:
    """Register a master: copy its weights into the registry, prepare its scheme, create its key.

    `weights` may be a safetensors file, a sharded folder or index, an fp16/bf16 file or a plain
    checkpoint; tensors the model lacks (extra heads, adapters) are kept and copied to buyers
    unmarked. `output` says what the model returns ("logits" or "embedding"), which decides how
    fidelity is measured and repaired; `loss` (module:function(output, master_output)) overrides it.
    `scheme_names` names the schemes to register (default: white-box, and black-box where the model is a
    classifier ending in a linear layer, with tensor inputs and training data); `bb_margin` and
    `bb_tilt` set the black-box mark's strengths (`schemes.blackbox.Config`); `image_psnr` and
    `image_layer` the output-image mark's visibility and layer, `image_mirror` whether it is built to
    survive surrogates trained on flipped pairs or edits of the images (`schemes.images.Config`).

    `fidelity_target` (default: `calibrate.DEFAULT_TARGET` for the output, 0: none) is the least
    fidelity a copy may have on the held-out split: `strength` becomes the ceiling of a search for the
    strongest mark that meets it (`schemes.whitebox.calibrate`, each trial reported to `progress`),
    and `issue` refuses to write a copy below it.
    """
    check_name(name)
    if any(m.name == name for m in reg.masters()):
        raise BadInput(f"master {name!r} is already registered")
    whitebox.check_options(strength, steps, placement, output, loss, layers)
    target = calibrate.DEFAULT_TARGET.get(output) if fidelity_target is None else fidelity_target
    if target is not None and not 0.0 <= target < 1.0:
        raise BadArgument("fidelity", f"{target}: use a fraction in [0, 1) (0: no target)")
    spec = codes.CodeSpec(symbols=bits // 8)
    if bits % 8 or bits < 72:
        raise BadArgument("bits", f"{bits}: use a multiple of 8, at least 72")
    try:
        spec.validate()
    except ValueError as e:
        raise BadInput(str(e)) from e
    source = formats.open_tensors(weights)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in source.items()}
    model, extras, train, test = _build(state, weights, factory, data)
    data_set = train if train is not None else test
    probe = modelio.tensors(data_set, COST_SAMPLES)[0] if data_set is not None else None  # a few real inputs
    options = {"carriers": carriers, "layers": layers, "strength": strength, "steps": steps,
               "placement": placement, "output": output, "loss": loss, "margin": bb_margin, "tilt": bb_tilt,
               "fidelity": target, "eval_samples": eval_samples, "progress": progress,
               "image_psnr": image_psnr, "image_layer": image_layer,
               "image_mirror": image_mirror}
    master = schemes.MasterModel(model, state, train, probe, test)
    prepared, stored = _prepare(master, spec.bits, options, scheme_names)
    accuracy = None
    if test is not None and output == "logits" and eval_samples != 0:
        logits, labels = fidelity.stream_outputs(model, modelio.stream(test, eval_samples))
        if labels is not None:
            accuracy = float((logits.argmax(1) == labels).float().mean())
    # Copies are written in the dtypes and shard count the master came in (fp16/bf16 stay half size;
    # a sharded Hugging Face folder gives sharded folders).
    config = MasterConfig(spec, prepared, eval_samples, source.dtypes, max(1, len(source.files)),
                          output, fidelity=(target or None) if test is not None else None,
                          format="gguf" if source.quants else "safetensors", quants=dict(source.quants))
    registered = {k: state[k] for k in extras} | {k: v.contiguous() for k, v in model.state_dict().items()}
    with reg.lock():  # one registration at a time: the name is checked and taken under the lock
        if any(m.name == name for m in reg.masters()):
            raise BadInput(f"master {name!r} is already registered")
        return _register(reg, name, registered, stored, factory, data, config, accuracy, source)


def _prepare(master: schemes.MasterModel, bits: int, options: dict,
             names: list[str] | None) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Each scheme's configuration and stored tensors. Asked for by name, a scheme that cannot mark
    this model is an error; by default the black-box scheme is left out where it cannot (an encoder,
    a model not ending in a linear layer, no training data), and the white-box one always runs."""
    explicit = names is not None
    names = list(dict.fromkeys(names)) if explicit else [whitebox.NAME, blackbox.NAME]
    if not names:
        raise BadArgument("schemes", "must name at least one scheme")
    for n in names:
        schemes.get(n)
    prepared: dict[str, dict] = {}
    stored: dict[str, torch.Tensor] = {}
    for n in names:
        if n == blackbox.NAME and options["output"] != "logits":
            if explicit:
                raise BadInput("the black-box scheme marks classifiers (--output logits) only")
            continue
        if n == blackbox.NAME and not explicit and _large(master.probe):
            continue
        try:
            config, tensors = schemes.get(n).prepare(master, bits, options)
        except BadInput:
            if explicit or n != blackbox.NAME:
                raise
            continue
        prepared[n] = config
        stored.update(tensors)
    return prepared, stored


def _large(probe) -> bool:
    """Inputs too large for the black-box scheme's default: it holds its training pool in memory
    (8,192 inputs: 4.9 GB of 224 x 224 crops) and stores its queries with the master."""
    return probe is not None and not isinstance(probe, dict) and probe[0].numel() > BLACKBOX_MAX_INPUT


def _build(state: dict[str, torch.Tensor], weights, factory: str, data: str | None):
    """The model with the master's weights (and the tensors it lacks), and the user's data splits."""
    model = modelio.import_object(factory)()
    extras = modelio.load_into(model, state, f"{weights}: weights do not fit the model built by {factory}")
    return model.eval(), extras, modelio.dataset(data, "train"), modelio.dataset(data, "test")


def _register(reg: Registry, name: str, weights: dict[str, torch.Tensor], stored: dict[str, torch.Tensor],
              factory: str, data: str | None, config: MasterConfig, accuracy: float | None,
              source: formats.TensorSource) -> Master:
    """Write the master's files and its row; called under the registry lock, with the name free.

    A key file already there (left by a registration killed before its row was written) is used, not
    replaced: a key file is never deleted or overwritten, so no failure here can lose one. Files left
    by such a run are rewritten; on failure only files this call created are removed. A GGUF master
    keeps its metadata beside its weights (`formats.gguf.save_template`): its copies are GGUF files."""
    dest = reg.weights_path(name)
    stored_path, template = reg.moments_path(dest), reg.template_path(dest)
    created = [p for p in (dest, stored_path, template) if not p.exists()]
    try:
        formats.save_safetensors(weights, dest)
        failpoint.reached("init:weights")
        if stored:
            formats.save_safetensors(stored, stored_path)
        if config.format == "gguf":
            formats.gguf.save_template(source, template)
        if reg.has_key(name):
            key = reg.key(name)
        else:
            key = keys.generate()
            reg.store_key(name, key)
        failpoint.reached("init:key")
        m = Master(name, dest, modelio.sha256_file(dest), factory, data, config, keys.fingerprint(key), accuracy)
        reg.add_master(m)
        failpoint.reached("init:registered")
    except BaseException:
        if not any(x.name == name for x in reg.masters()):
            for p in created:
                p.unlink(missing_ok=True)
        raise
    return m


def ensure_example(reg: Registry, epochs: int = 2, progress: Callable[[int, int], None] | None = None) -> Master:
    """The bundled Fashion-MNIST master, trained once and registered, for commands run with no setup.
    Under the registry lock: of two first runs at once, one trains and registers, the other waits."""
    with reg.lock():
        for m in reg.masters():
            if m.name == EXAMPLE_MASTER:
                return m
        from .. import example

        trained = reg.cache_path(f"{EXAMPLE_MASTER}.safetensors")
        if not trained.exists():
            trained.parent.mkdir(mode=0o700, exist_ok=True)
            example.train_master(trained, epochs=epochs, progress=progress)
        return init(reg, EXAMPLE_MASTER, trained, EXAMPLE_FACTORY, EXAMPLE_DATA, strength=EXAMPLE_STRENGTH)

