"""Adapter folders shaped exactly as diffusers' own training scripts write them, built with diffusers and peft.

- `write_custom_diffusion`: examples/custom_diffusion/train_custom_diffusion.py. Its processors (train_kv on attn2,
  nothing on attn1; train_q_out with `--freeze_model crossattn`), initialised from the UNet's own weights as the
  script does, "trained" by a seeded perturbation; saved with `unet.save_attn_procs(out, safe_serialization=...)`;
  with a modifier token, the token added to the tokenizer, its row initialised from the initializer token, then
  saved as the script's `save_new_embed` does (`<token>.safetensors` via safetensors' save_file, or `<token>.bin`
  via torch.save, both {token: (d_text,)}).
- `write_lora`: examples/instruct_pix2pix/train_instruct_pix2pix_lora.py (and train_text_to_image_lora.py): peft
  LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", to_k/to_q/to_v/to_out.0), `unet.add_adapter`, saved with
  `StableDiffusionInstructPix2PixPipeline.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(
  get_peft_model_state_dict(unet)))`.
"""

from __future__ import annotations

import os

import torch


def _hidden_size(unet, name: str) -> int:
    """The script's rule: block_out_channels of the processor's block (reversed for up blocks, last for mid)."""
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(channels))[int(name[len("up_blocks.")])]
    return channels[int(name[len("down_blocks.")])]


def write_custom_diffusion(pipe, folder, seed: int = 0, safe: bool = True, modifier_token: str | None = None,
                           initializer_token: str = "a", freeze_model: str = "crossattn_kv", strength: float = 0.5):
    """Write what train_custom_diffusion.py leaves in its output_dir (weights only; the script's logs aside).

    Changes `pipe` as the script changes its models (processors set, token added); pass a fresh pipeline.
    """
    import safetensors.torch
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    unet, gen = pipe.unet, torch.Generator().manual_seed(seed)
    train_q_out = freeze_model != "crossattn_kv"
    state = unet.state_dict()
    processors = {}
    for name in unet.attn_processors:
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        layer = name.split(".processor")[0]
        if cross is None:
            processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False,
                                                               hidden_size=_hidden_size(unet, name), cross_attention_dim=None)
            continue
        weights = {"to_k_custom_diffusion.weight": state[layer + ".to_k.weight"], "to_v_custom_diffusion.weight": state[layer + ".to_v.weight"]}
        if train_q_out:
            weights["to_q_custom_diffusion.weight"] = state[layer + ".to_q.weight"]
            weights["to_out_custom_diffusion.0.weight"] = state[layer + ".to_out.0.weight"]
            weights["to_out_custom_diffusion.0.bias"] = state[layer + ".to_out.0.bias"]
        proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=train_q_out, hidden_size=_hidden_size(unet, name),
                                               cross_attention_dim=cross)
        proc.load_state_dict(weights)
        with torch.no_grad():  # what training would do: move K/V away from the base
            for param in (proc.to_k_custom_diffusion.weight, proc.to_v_custom_diffusion.weight):
                param.add_(strength * param.std() * torch.randn(param.shape, generator=gen))
        processors[name] = proc
    unet.set_attn_processor(processors)
    os.makedirs(folder, exist_ok=True)
    unet.save_attn_procs(str(folder), safe_serialization=safe)
    if modifier_token is not None:
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
        assert tokenizer.add_tokens(modifier_token) == 1
        init_id = tokenizer.encode([initializer_token], add_special_tokens=False)[0]
        token_id = tokenizer.convert_tokens_to_ids(modifier_token)
        text_encoder.resize_token_embeddings(len(tokenizer))
        embeds = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeds[token_id] = embeds[init_id] + 0.5 * torch.randn(embeds.shape[1], generator=gen)
        learned = {modifier_token: embeds[token_id].detach().clone()}
        if safe:
            safetensors.torch.save_file(learned, f"{folder}/{modifier_token}.safetensors", metadata={"format": "pt"})
        else:
            torch.save(learned, f"{folder}/{modifier_token}.bin")
    return str(folder)


def write_lora(pipe, folder, seed: int = 0, rank: int = 4):
    """Write what train_instruct_pix2pix_lora.py saves: pytorch_lora_weights.safetensors, no metadata."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # training moves B off zero
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return str(folder)
