"""`wmtrace edit-images ...`: edit a denoiser's output images as a leaker would, to measure what tracing survives.

One command per image attack family (`wmtrace.attacks.IMAGE_ATTACKS`), built from its declaration the
way `wmtrace attack`'s commands are built from weight attacks' (the same `attack._option` per
parameter), plus IN... (image files or folders of them), `-o/--out` (a folder), `--seed` and `--json`.
Results are written as lossless PNG named after their inputs' stems, so a re-encoding on the way out
adds nothing the attack did not do. A merging attack (`average`) takes each IN as one copy's images
(a folder, or a single image file) and pairs them by name across the copies.
"""

from __future__ import annotations

import enum
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from ..attacks import IMAGE_ATTACKS, ImageAttack, edit_images, imaging
from ..errors import BadInput
from .attack import _option
from .common import JsonOpt, derived, emit, group, out

app = group("Edit output images as a leaker would (writes PNG), to measure what a trace of images survives.")

InArg = Annotated[list[Path], typer.Argument(help="Image files, or folders of them (their image files, by name)",
                                             metavar="IN", show_default=False)]
CopiesArg = Annotated[list[Path], typer.Argument(
    help="Two or more copies' images: each a folder (or one image file) of the images one copy produced; "
         "images are paired by file name across the copies, and every copy must hold the same names",
    metavar="COPY", show_default=False)]
OutOpt = Annotated[Path, typer.Option("-o", "--out", help="Folder to write the edited images to (NAME.png each)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (crop positions, noise, jitter factors)")]


def _distinct(files: list[Path], where: str) -> None:
    """Refuse two inputs with one stem before any work: their results would be written to one file."""
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise BadInput(f"{seen[f.stem]} and {f} {where}would both be written as {f.stem}.png")
        seen[f.stem] = f


def _copies(paths: list[Path]) -> tuple[list[str], list[list[Path]]]:
    """Each copy's image files, in one order of names shared by every copy."""
    if len(paths) < 2:
        raise BadInput("give the images of at least two copies to merge (one folder per copy)")
    listed = []
    for p in paths:
        files = imaging.image_files([p])
        _distinct(files, f"(in {p}) ")
        listed.append({f.stem: f for f in files})
    names = sorted(listed[0])
    for p, files in zip(paths[1:], listed[1:], strict=True):
        missing = sorted(set(names) ^ set(files))
        if missing:
            where = paths[0] if missing[0] not in listed[0] else p
            raise BadInput(f"{missing[0]}: in {where} only; every copy must hold images of the same names")
    return names, [[files[n] for n in names] for files in listed]


def _edit(attack: ImageAttack, paths: list[Path], folder: Path, seed: int, params: dict) -> dict:
    """Read, edit, write; nothing is written before every input has been read and edited."""
    kept = {p.resolve() for p in paths if p.is_dir()}
    if folder.resolve() in kept:
        raise BadInput(f"{folder}: is one of the input folders; write to another folder")
    if attack.merges:
        names, files = _copies(paths)
        copies = [[imaging.read_image(f) for f in copy] for copy in files]
        edited = edit_images(attack.name, copies, seed=seed, **params)
        inputs = [f for copy in files for f in copy]
    else:
        inputs = imaging.image_files(paths)
        _distinct(inputs, "")
        names = [f.stem for f in inputs]
        edited = edit_images(attack.name, [imaging.read_image(f) for f in inputs], seed=seed, **params)
    written = imaging.write_images(list(zip(names, edited, strict=True)), folder, inputs)
    shapes = sorted({f"{a.shape[1]}x{a.shape[0]}" for a in edited})
    return {"attack": attack.name, "inputs": [str(p) for p in paths], "output": str(folder), "images": len(written),
            "files": [str(w) for w in written], "seed": seed, **params, "sizes": shapes}


def _signature(attack: ImageAttack) -> inspect.Signature:
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("paths", kw, annotation=CopiesArg if attack.merges else InArg),
              inspect.Parameter("out_path", kw, annotation=OutOpt)]
    params += [_option(attack, p) for p in attack.params]  # `_option` reads only the name and the Param
    params += [inspect.Parameter("seed", kw, annotation=SeedOpt, default=0),
               inspect.Parameter("as_json", kw, annotation=JsonOpt, default=False)]
    return inspect.Signature(params)


def _report(attack: ImageAttack, info: dict) -> None:
    shown = ", ".join(f"{p.name} {info[p.name]}" for p in attack.params)
    what = f" ({shown})" if shown else ""
    sizes = f", {' '.join(info['sizes'])}" if len(info["sizes"]) <= 3 else ""
    out.print(f"{attack.name}{what}: {info['images']} images from {', '.join(info['inputs'])} "
              f"-> {info['output']}{sizes}")


def command(attack: ImageAttack):
    """The typer command of one image attack: its declaration's options in, `attacks.edit_images` out."""

    def run(paths: list[Path], out_path: Path, seed: int = 0, as_json: bool = False, **params: Any) -> None:
        params = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in params.items()}
        info = _edit(attack, list(paths), out_path, seed, params)
        if as_json:
            emit(info)
        else:
            _report(attack, info)

    return derived(run, "edit_images_" + attack.name.replace("-", "_"), attack.summary, _signature(attack))


for _attack in IMAGE_ATTACKS.values():
    app.command(_attack.name, help=_attack.summary)(command(_attack))
