"""Per-sample cross-attention K/V: different attn2 K/V adapters for the rows of one UNet batch.

In IP2P the instruction reaches the UNet only through cross-attention, and attn2's K and V read only the text
features (the image enters through conv_in). So an attn2 K/V adapter (Custom Diffusion, LoRA on to_k/to_v, a
merged adapter) changes nothing but K = W_k c and V = W_v c of its rows' 77 text tokens, and those do not depend
on the latent: they are the same at every denoising step. `kv_for_rows` computes them once per pipeline call,
each row with its own weights:

- base row: K = c W0^T
- Custom Diffusion row: K = c W_task^T (full weights)
- LoRA row: K = c W0^T + s (c A^T) B^T, s = alpha / r (peft's forward, regrouped)

`PerSampleKV` is the attn2 processor that uses them: with `adapter_kv` in cross_attention_kwargs it attends to the
given K/V; without it, it runs the processor it replaced, unchanged. The K/V travel as call arguments, so a
compiled UNet sees new tensor values, not new code or new Parameters: changing the mix does not recompile.
`IgnoreKV` wraps every other attention processor so that it accepts (and ignores) the same keyword.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KV_KWARG = "adapter_kv"  # the cross_attention_kwargs key: {attn2 module path: (K, V)}, each (rows, 77, d_out)


class PerSampleKV:
    """attn2 processor: scaled dot-product attention over per-row K/V given by the caller (AttnProcessor2_0's
    maths, with to_k/to_v replaced by the given tensors), or the original processor when none are given."""

    def __init__(self, name: str, inner):
        self.name = name  # attn2 module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, adapter_kv=None):
        if adapter_kv is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        key, value = adapter_kv[self.name]  # (rows, 77, d_out) each
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens = key.shape[0], key.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, HW, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, 77, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, HW, inner)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class IgnoreKV:
    """Any other attention processor, accepting `adapter_kv` (diffusers warns on every call about a keyword a
    processor's signature lacks, and the self-attention layers receive the same cross_attention_kwargs)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, adapter_kv=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install(unet, kv_names) -> dict:
    """Wrap every attention processor of `unet` (PerSampleKV on the attn2 layers in `kv_names`, IgnoreKV elsewhere);
    return the original processors (module path -> processor) for `uninstall`. Call it before torch.compile."""
    from ..base import unwrap_compiled

    originals = {}
    for name, module in unwrap_compiled(unet).named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        if isinstance(processor, (PerSampleKV, IgnoreKV)):
            processor = processor.inner
        originals[name] = processor
        module.processor = PerSampleKV(name, processor) if name in kv_names else IgnoreKV(processor)
    return originals


def uninstall(unet, originals: dict) -> None:
    """Put back the processors `install` replaced."""
    from ..base import unwrap_compiled

    for name, module in unwrap_compiled(unet).named_modules():
        if name in originals:
            module.processor = originals[name]


@torch.no_grad()
def kv_for_rows(layers: dict, text: torch.Tensor, row_kv: list) -> dict:
    """{attn2 path: (K, V)} for every row of the UNet batch, each row with its own adapter.

    layers: {"<attn2 path>.to_k" / ".to_v": the live Linear holding the BASE weight W0 (d_out, d_text)}.
    text: (rows, 77, d_text) encoder hidden states as the UNet receives them ([text, "", ""] x B with guidance).
    row_kv: per row, a `RowWeights` (or None for the base). Rows sharing one are computed together.
    """
    groups: dict[int, tuple[object, list[int]]] = {}
    for row, weights in enumerate(row_kv):
        groups.setdefault(id(weights), (weights, []))[1].append(row)
    out = {}
    for path, layer in layers.items():
        w0 = layer.weight  # (d_out, d_text)
        result = text.new_empty(text.shape[0], text.shape[1], w0.shape[0])  # (rows, 77, d_out)
        for weights, rows in groups.values():
            index = torch.tensor(rows, device=text.device)
            c = text.index_select(0, index)  # (n, 77, d_text)
            result.index_copy_(0, index, project(c, w0, weights, path))
        attn, proj = path.rsplit(".", 1)
        out.setdefault(attn, [None, None])[0 if proj == "to_k" else 1] = result
    return {attn: tuple(kv) for attn, kv in out.items()}


def project(c: torch.Tensor, w0: torch.Tensor, weights, path: str) -> torch.Tensor:
    """(n, 77, d_text) -> (n, 77, d_out) through one adapter's K or V projection (None: the base)."""
    if weights is None or path not in weights.layers:
        return F.linear(c, w0)
    kind, tensors = weights.layers[path]
    if kind == "full":  # Custom Diffusion: W_task
        return F.linear(c, tensors.to(c.device, c.dtype))
    lora_a, lora_b, scale = tensors  # A (r, d_in), B (d_out, r)
    return F.linear(c, w0) + F.linear(F.linear(c, lora_a.to(c.device, c.dtype)), lora_b.to(c.device, c.dtype)) * scale


class RowWeights:
    """One adapter's attn2 K/V as the batched path reads them: {"<attn2 path>.to_k": ("full", W) or
    ("lora", (A, B, scale))}. Built by each method's `row_weights`; layers absent use the base weight."""

    def __init__(self, task: str, layers: dict):
        self.task = task
        self.layers = layers
