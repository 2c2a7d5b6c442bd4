"""Options several `adapterkit` commands share: the base, the sampler, the device (cli.py's commands use them)."""

from __future__ import annotations

import click

from .devices import AUTO, DEFAULT_DTYPE, DEVICE_HELP, DTYPE_HELP, DTYPE_NAMES
from .inference import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS

BASE_HELP = "IP2P base: hub id, local diffusers folder, builtin:tiny (bundled, trained) or builtin:tiny-random."
SPEC_HELP = " A folder without adapter.json takes its task and instructions as DIR::task=NAME::instruction=TEXT (or adopt it with `adapterkit import`)."


def sampler_options() -> list:
    """--steps/--guidance/--image-guidance: unset means the base's recorded default, else the blog's (issue 18)."""
    recorded = "the base's recorded default (adapterkit_base.json), else"
    return [
        click.option("--steps", default=None, type=click.IntRange(1, 1000), help=f"Denoising steps [default: {recorded} {DEFAULT_STEPS}]"),
        click.option("--guidance", default=None, type=float, help=f"Text guidance scale s_T [default: {recorded} {DEFAULT_GUIDANCE:g}]"),
        click.option("--image-guidance", default=None, type=float, help=f"Image guidance scale s_I [default: {recorded} {DEFAULT_IMAGE_GUIDANCE:g}]"),
    ]


def device_options() -> list:
    """--device/--dtype (adapterkit/devices.py): the GPU when torch sees one, else the CPU; float32 unless asked."""
    return [
        click.option("--device", default=AUTO, show_default=True, help="Where the pipeline runs: " + DEVICE_HELP),
        click.option("--dtype", default=DEFAULT_DTYPE, show_default=True, type=click.Choice(DTYPE_NAMES), help=DTYPE_HELP),
    ]


def generation_options() -> list:
    """--steps/--guidance/--image-guidance/--seed/--resolution/--device/--dtype, for commands that run the pipeline."""
    return [
        *sampler_options(),
        click.option("--seed", default=0, show_default=True, type=int, help='Seed of torch.Generator("cpu") passed to the pipeline.'),
        click.option("--resolution", default=None, type=click.IntRange(8, 4096),
                     help="Resize so the shorter side is this (multiples of 8). Default: the input's own size "
                          "(edited at sides rounded down to the VAE's multiple, then resized back), a shorter side "
                          "over 4x the base's training resolution scaled down to that (builtin:tiny: 256)."),
        *device_options(),
    ]


def with_options(options):
    """Decorator adding a list of click options (in order) to a command: @with_options(sampler_options)."""
    def decorate(f):
        for option in reversed(options()):
            f = option(f)
        return f
    return decorate
