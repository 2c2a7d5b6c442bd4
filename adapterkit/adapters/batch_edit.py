"""AdapterBank.edit_batch: many images, each with its own task (or the base) and seed, in one pipeline call per size.

How one call is run (a "group": the images of one size):
1. The instructions are encoded once as the pipeline does (`_encode_prompt`): (3B, 77, d_text) rows
   [text x B, "" x B, "" x B] with two-way guidance, (B, 77, d_text) without. Row j belongs to image j % B.
2. Every attn2 K/V of every row is computed once from that row's adapter (adapters/batched.py), and passed to the
   UNet through cross_attention_kwargs; the live weights stay the base's (the bank is deactivated first).
3. One pipeline call with the same embeddings and one torch.Generator("cpu").manual_seed(seed) per image: diffusers
   draws each image's initial noise and every ancestral-step noise from its own generator, so each image equals the
   same image edited alone (`bank.edit(image, instruction, task=task, seed=seed)`) up to float rounding.
4. The VAE encodes the inputs and decodes the outputs one image at a time (`one_image_at_a_time`): a batch of
   8 decoded at once held 6x the memory for no speed.

A group whose rows all use one task whose adapter cannot be mixed (LoRA beyond attn2 K/V, modifier tokens) runs the swap path
instead: activate it, one batched call. Mixing such an adapter with other tasks in one group is refused.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import AdapterkitError
from ..inference import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS, resize_for_edit, to_rgb
from .batched import KV_KWARG, RowWeights, kv_for_rows
from .registry import get_method

AUTO = "auto"  # as adapters.bank.AUTO (not imported: bank imports this module)


def resolve_tasks(bank, instructions: list[str], tasks) -> list[str | None]:
    """One task (or None) per image: given names checked, AUTO (or tasks=None) routed by instruction."""
    tasks = [AUTO] * len(instructions) if tasks is None else list(tasks)
    if len(tasks) != len(instructions):
        raise AdapterkitError(f"{len(tasks)} tasks for {len(instructions)} instructions; give one task (or None) per image")
    resolved = []
    for task, instruction in zip(tasks, instructions):
        if task == AUTO:
            task = bank.route(instruction)[0]
        elif task is not None:
            bank.get(task)  # raises naming the loaded tasks
        resolved.append(task)
    return resolved


def row_weights(adapter) -> RowWeights:
    """The adapter's K/V in the form the batched path reads (raises for adapters that cannot be mixed)."""
    method = get_method(adapter.method)
    if adapter.tokens:  # modifier tokens live in the shared tokenizer and text encoder: one set per pipeline call
        raise AdapterkitError(
            f"task '{adapter.task}' owns modifier token(s) {', '.join(adapter.tokens)}, which cannot differ per image; "
            "edit it in a batch of its own"
        )
    if not hasattr(method, "batch_kv"):
        raise AdapterkitError(
            f"method '{adapter.method}' has no per-sample K/V path (batch_kv); edit task '{adapter.task}' in a batch of its own"
        )
    return RowWeights(adapter.task, method.batch_kv(adapter.tensors, adapter.options))


def edit_batch(bank, images, instructions, tasks=None, seeds=None, **options) -> list:
    """See AdapterBank.edit_batch. Returns one output per image, in input order."""
    n = len(images)
    if len(instructions) != n:
        raise AdapterkitError(f"{n} images but {len(instructions)} instructions; give one instruction per image")
    seeds = [0] * n if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise AdapterkitError(f"{len(seeds)} seeds for {n} images; give one seed per image (or none: 0 each)")
    if n == 0:
        return []
    resolution = options.pop("resolution", None)
    prepared = [resize_for_edit(to_rgb(img), resolution) for img in images]
    resolved = resolve_tasks(bank, list(instructions), tasks)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(prepared):
        groups.setdefault(img.size, []).append(i)
    outputs = [None] * n
    for indices in groups.values():
        results = run_group(bank, [prepared[i] for i in indices], [instructions[i] for i in indices],
                            [resolved[i] for i in indices], [seeds[i] for i in indices], **options)
        for i, result in zip(indices, results):
            outputs[i] = result
    return outputs


class Stopped(Exception):
    """`edit_batch(..., stop=f)`: f() turned true between two denoising steps, so the call ended early. Not an
    AdapterkitError: callers that retry a failed batch one image at a time must not retry a stopped one."""


def _stop_between_steps(stop):
    """A diffusers callback_on_step_end that raises Stopped once stop() is true (the IP2P pipeline has no
    `interrupt`); None when there is nothing to check."""
    if stop is None:
        return None

    def callback(_pipe, step, _timestep, tensors):
        if stop():
            raise Stopped(f"stopped after step {step + 1}")
        return tensors

    return callback


def run_group(bank, images, instructions, tasks, seeds, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
              image_guidance: float = DEFAULT_IMAGE_GUIDANCE, output_type: str = "pil", stop=None):
    """One pipeline call for images of one size (bank lock held by the caller); `stop`: see Stopped."""
    pipe = bank.pipe
    weights = {}
    try:
        for task in dict.fromkeys(t for t in tasks if t is not None):
            weights[task] = bank.row_weights(task)
        mixed = True
    except AdapterkitError:
        if len(set(tasks)) > 1:
            raise
        mixed = False
    guided = guidance > 1.0 and image_guidance >= 1.0  # the pipeline's own rule for two-way guidance
    call = dict(image=images, num_inference_steps=steps, guidance_scale=guidance, image_guidance_scale=image_guidance,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type=output_type,
                callback_on_step_end=_stop_between_steps(stop))
    with torch.no_grad(), one_image_at_a_time(pipe.vae):
        if not mixed:  # one task whose adapter cannot be mixed: the swap path, one batched call
            bank.activate(tasks[0])
            return list(pipe(list(instructions), **call).images)
        bank.deactivate()  # live K/V = the base's; the LoRA slot inert
        device = pipe._execution_device
        text = pipe._encode_prompt(list(instructions), device, 1, guided)  # (3B | B, 77, d_text)
        b = len(images)
        per_row = [weights.get(tasks[j % b]) for j in range(text.shape[0])]
        for task in weights:
            bank.touch(task)
        kv = kv_for_rows(bank.kv_layers, text, per_row)
        embeds = dict(prompt_embeds=text[:b], negative_prompt_embeds=text[b:2 * b] if guided else None)
        result = pipe(**embeds, **call, cross_attention_kwargs={KV_KWARG: kv})
    return list(result.images)


@contextlib.contextmanager
def one_image_at_a_time(vae):
    """The VAE encodes and decodes a batch one image at a time while active (diffusers' `use_slicing`, restored
    after): the UNet gains from a batch, the VAE does not. Decoding 8 latents of SD1.5's VAE at 512 px raised peak
    RSS by 6.2 GB batched and 1.0 GB sliced, 135 s vs 127 s on 2 CPU cores (bench/batch_decode_memory.py)."""
    before = getattr(vae, "use_slicing", None)
    if before is None:  # a VAE class without slicing: as it is
        yield
        return
    vae.use_slicing = True
    try:
        yield
    finally:
        vae.use_slicing = before
