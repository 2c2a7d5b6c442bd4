"""Examples -> training tensors: IP2P's paired crop/flip, instruction sampling, the VAE and text encoders, and the
latent cache of `--cache-latents`. Datasets themselves are read by adapterkit/data/.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data import EditDataset, EditExample
from ..errors import AdapterkitError
from ..inference import encode_text as _encode


# ------------------------------------------------------------------------------------------------ transforms
def paired_transform(
    example: EditExample, resolution: int, generator: torch.Generator, center_crop: bool = False, random_flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """IP2P augmentation: shorter side -> resolution, one crop and one flip shared by input and target.

    Returns two (3, R, R) tensors in [-1, 1]. The target is first resized to the input's size if they differ.
    Draws exactly three numbers from `generator` (crop x, crop y, flip) whatever the options, so the random
    stream does not depend on them.
    """
    source, target = example.input, example.target
    if target.size != source.size:
        target = target.resize(source.size, Image.BICUBIC)
    w, h = source.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    source, target = source.resize(size, Image.BICUBIC), target.resize(size, Image.BICUBIC)
    draws = torch.rand(3, generator=generator)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = int(draws[0] * (size[0] - resolution + 1)), int(draws[1] * (size[1] - resolution + 1))
    box = (left, top, left + resolution, top + resolution)
    pair = torch.stack([to_tensor(source.crop(box)), to_tensor(target.crop(box))])  # (2, 3, R, R)
    if random_flip and draws[2] < 0.5:
        pair = pair.flip(-1)
    return pair[0], pair[1]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) float32 in [-1, 1], the VAE's input range."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def sample_instruction(example_instruction: str, synonyms: list[str], generator: torch.Generator) -> str:
    """The example's own instruction, or one of `synonyms` drawn uniformly (one draw per example per step)."""
    if not synonyms:
        return example_instruction
    return synonyms[int(torch.randint(len(synonyms), (1,), generator=generator))]


# ------------------------------------------------------------------------------------------------ encoders
@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, R, R) in [-1, 1] -> posterior mode, mean, std, each (B, 4, R/f, R/f), float32, unscaled.

    The mode is what the IP2P pipeline feeds as the image condition (diffusers: `latent_dist.mode()`, no scaling
    factor); mean and std let the training target be sampled per step, as diffusers' script does with `.sample()`.
    """
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mode().float(), dist.mean.float(), dist.std.float()


def encode_text(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    """Instructions -> (B, 77, d) last hidden states of the text encoder, float32 (the UNet's cross-attention input)."""
    return _encode(tokenizer, text_encoder, texts).hidden


@dataclass
class LatentCache:
    """`--cache-latents`: every training row encoded once, for small datasets.

    Images use the center crop (a random crop would need every crop encoded); with random_flip the mirrored pair
    is encoded too, so flipping stays exact. Per row and flip: the conditioning latent is the VAE posterior mode
    (what the pipeline uses at inference), the target keeps the posterior mean and std so a fresh target latent
    is sampled every step exactly as without the cache. Text features are kept per distinct instruction.
    Tensors live on the CPU: (N, F, 4, h, w) with F = 2 flips or 1.
    """

    rows: dict[int, int]  # dataset index -> position in the tensors
    cond: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    text: dict[str, torch.Tensor]  # instruction -> (77, d)

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: EditDataset, indices: list[int], vae, tokenizer, text_encoder, instructions: list[str],
              resolution: int, random_flip: bool, batch_size: int = 8, quiet: bool = False) -> LatentCache:
        from tqdm.auto import tqdm

        flips = 2 if random_flip else 1
        positions: dict[int, int] = {}
        cond, mean, std = [], [], []
        center = torch.Generator().manual_seed(0)  # paired_transform draws from it; center crop without flip ignores the draws
        for start in tqdm(range(0, len(indices), batch_size), desc="cache latents", disable=quiet):
            batch = [(i, ex) for i in indices[start:start + batch_size] if (ex := dataset.get(i)) is not None]
            if not batch:
                continue
            pairs = [paired_transform(ex, resolution, center, center_crop=True, random_flip=False) for _i, ex in batch]
            pixels = torch.stack([torch.stack(p) for p in pairs])  # (b, 2, 3, R, R): input, target
            if flips == 2:
                pixels = torch.stack([pixels, pixels.flip(-1)], dim=1)  # (b, 2 flips, 2, 3, R, R)
            else:
                pixels = pixels[:, None]  # (b, 1, 2, 3, R, R)
            b = pixels.shape[0]
            flat = pixels.reshape(b * flips * 2, *pixels.shape[-3:])  # (b * F * 2, 3, R, R)
            mode, mu, sigma = (t.reshape(b, flips, 2, *t.shape[1:]) for t in encode_images(vae, flat))
            cond.append(mode[:, :, 0].cpu())  # input image -> condition
            mean.append(mu[:, :, 1].cpu())  # target image -> posterior to sample from
            std.append(sigma[:, :, 1].cpu())
            for i, _ex in batch:
                positions[i] = len(positions)
        if not positions:
            raise AdapterkitError(f"no training row of {dataset.source} has readable images ({len(dataset.skipped)} skipped)")
        texts = sorted(set(instructions) | {dataset.instructions[i] for i in positions} | {""})
        features = {}
        for start in range(0, len(texts), 64):
            chunk = texts[start:start + 64]
            for text, feature in zip(chunk, encode_text(tokenizer, text_encoder, chunk).cpu()):
                features[text] = feature
        return cls(
            rows=positions,
            cond=torch.cat(cond),
            mean=torch.cat(mean),
            std=torch.cat(std),
            text=features,
        )


def seeded_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, keys): independent streams, no state to checkpoint."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass
class BatchStream:
    """The training batches of one process: steps, micro-steps and processes tile one long stream of samples.

    Epoch e visits the training rows (`indices`) in the order of a permutation seeded by (seed, e); an unreadable
    row is replaced by the next readable one. With a latent cache, rows come from it instead of the images.
    """

    dataset: EditDataset
    indices: list[int]  # training rows (dataset indices)
    pipe: object  # the base pipeline: its vae, tokenizer and text_encoder
    synonyms: list[str]
    resolution: int
    batch_size: int
    accumulation: int  # micro-steps per optimizer step
    world: int  # processes
    rank: int  # this process
    seed: int
    center_crop: bool
    random_flip: bool
    device: object
    cache: LatentCache | None = None
    _perm: tuple[int, torch.Tensor] | None = None

    def batch(self, step: int, micro: int, generator: torch.Generator):
        """(scaled target latents, condition latents, text features) for this process's share of the micro-step."""
        vae = self.pipe.vae
        # Global sample positions of this process's batch: steps, micro-steps and processes tile one long stream.
        first = ((step * self.accumulation + micro) * self.world + self.rank) * self.batch_size
        rows = [self.row(position) for position in range(first, first + self.batch_size)]
        if self.cache is not None:
            return self._from_cache(rows, generator)
        inputs, targets, texts = [], [], []
        for row, example in rows:
            source, target = paired_transform(example, self.resolution, generator, self.center_crop, self.random_flip)
            inputs.append(source)
            targets.append(target)
            texts.append(sample_instruction(example.instruction, self.synonyms, generator))
        b = len(rows)
        mode, mean, std = encode_images(vae, torch.stack(inputs + targets))  # each (2B, 4, h, w)
        # Target: a fresh posterior sample per step, as diffusers' script (`latent_dist.sample()`), times the VAE's scale.
        eps = torch.randn(mean[b:].shape, generator=generator).to(mean.device)
        latents = (mean[b:] + std[b:] * eps) * vae.config.scaling_factor
        text = encode_text(self.pipe.tokenizer, self.pipe.text_encoder, texts)
        return latents.to(self.device), mode[:b].to(self.device), text.to(self.device)

    def _from_cache(self, rows, generator: torch.Generator):
        cache = self.cache
        positions, flips, texts = [], [], []
        for row, instruction in rows:
            texts.append(sample_instruction(instruction, self.synonyms, generator))
            flip = bool(torch.rand(1, generator=generator) < 0.5) and cache.cond.shape[1] == 2
            positions.append(cache.rows[row])
            flips.append(int(flip))
        index = (torch.tensor(positions), torch.tensor(flips))
        mean, std = cache.mean[index], cache.std[index]  # (B, 4, h, w)
        eps = torch.randn(mean.shape, generator=generator)
        latents = (mean + std * eps) * self.pipe.vae.config.scaling_factor
        text = torch.stack([cache.text[t] for t in texts])  # (B, 77, d)
        return latents.to(self.device), cache.cond[index].to(self.device), text.to(self.device)

    def row(self, position: int):
        """(dataset index, example) at a stream position; with the latent cache the example is only its instruction
        (the images were encoded already)."""
        n = len(self.indices)
        epoch, offset = divmod(position, n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(n, generator=seeded_generator(self.seed, "epoch", epoch)))
        perm = self._perm[1]
        for k in range(n):
            index = self.indices[int(perm[(offset + k) % n])]
            if self.cache is not None:
                if index in self.cache.rows:
                    return index, self.dataset.instructions[index]
                continue
            example = self.dataset.get(index)
            if example is not None:
                return index, example
        raise AdapterkitError(f"no training row of {self.dataset.source} has readable images ({len(self.dataset.skipped)} skipped)")
