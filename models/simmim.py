"""SimMIM: masked image modelling for Swin V1 and V2 (Xie et al., CVPR 2022).

The paper's framework (§3) has four parts, each a piece of this file:

* **Masking** (§3.1, "random masking"): patches of ``mask_patch`` pixels are masked at random;
  the mask itself is drawn by the data pipeline (``data/simmim.py``) and reaches the model as a
  (B, H/P, W/P) map over the encoder's patch tokens (P = the encoder's patch size).
* **Encoder** (§3.2): any Swin trunk; the embeddings of masked tokens are replaced by one
  learned ``mask_token`` before the stages (:func:`replace_masked_tokens`).
* **Prediction head** (§3.3): one 1×1 convolution from the last stage's features to
  stride²·3 values per position, then a pixel shuffle back to the image (:class:`SimMIM`).
* **Prediction target** (§3.4): the raw pixels, optionally each normalised by the mean and
  standard deviation of its 47×47 neighbourhood (:func:`normalise_targets`); the loss is L1 over
  the masked pixels only (:func:`masked_l1_loss`).

State-dict keys follow the release (``encoder.*`` with ``encoder.mask_token``, ``decoder.0.*``),
so its SimMIM checkpoints load here and ours load there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from models.swin_transformer import SwinTransformer


def replace_masked_tokens(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Patch embeddings with the masked ones swapped for the mask token.

    Args:
        tokens: (B, h, w, C) patch embeddings.
        mask: (B, h, w), 1 where the patch is masked, 0 where it is visible (any dtype).
        mask_token: (1, 1, C), broadcast over every masked position.
    Returns:
        (B, h, w, C): ``tokens·(1 − m) + mask_token·m`` (a blend, so the token gets gradients).
    """
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return tokens * (1.0 - m) + mask_token.to(tokens.dtype).view(1, 1, 1, -1) * m


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A token mask blown up to pixels.

    Args:
        mask: (B, h, w) over patch tokens.
        patch_size: pixels per token side.
    Returns:
        (B, 1, h·P, w·P) float, each token's value repeated over its P×P pixels.
    """
    m = mask.to(torch.float32).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return m.unsqueeze(1)


def local_mean_std(images: torch.Tensor, window: int = 47) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each pixel's ``window``×``window`` neighbourhood.

    Neighbourhoods are clipped at the border (padding is not counted); the variance is the
    unbiased one of the pixels inside, clamped at 0, and 1e-6 is added before the square root.

    Args:
        images: (B, C, H, W) float.
        window: odd side of the neighbourhood.
    Returns:
        (mean, std), each (B, C, H, W), per channel.
    """
    if window % 2 != 1:
        raise ValueError(f"the normalisation window must be odd, got {window}")
    pad = window // 2
    mean = F.avg_pool2d(images, window, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(images * images, window, stride=1, padding=pad, count_include_pad=False)
    ones = torch.ones_like(images[:1, :1])
    count = F.avg_pool2d(ones, window, stride=1, padding=pad, count_include_pad=True) * window * window
    var = ((mean_sq - mean * mean) * (count / (count - 1))).clamp(min=0.0)
    return mean, (var + 1e-6).sqrt()


def normalise_targets(images: torch.Tensor, window: int = 47) -> torch.Tensor:
    """Each pixel minus the mean of its ``window``×``window`` neighbourhood, over its std (§3.4).

    Args:
        images: (B, C, H, W) float.
    Returns:
        (B, C, H, W); see :func:`local_mean_std` for the neighbourhood statistics.
    """
    mean, std = local_mean_std(images, window)
    return (images - mean) / std


def masked_l1_loss(target: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the masked pixels, as the release normalises it.

    Args:
        target, prediction: (B, C, H, W).
        mask: (B, 1, H, W), 1 on masked pixels.
    Returns:
        Scalar: Σ |target − prediction|·mask / (Σ mask + 1e-5) / C, i.e. the per-channel mean
        over masked pixels (1e-5 keeps an all-visible batch at 0 instead of NaN).
    """
    err = (target - prediction).abs() * mask
    return err.sum() / (mask.sum() + 1e-5) / target.shape[1]


class SimMIM(nn.Module):
    """A Swin encoder with a mask token and a one-layer pixel decoder; ``forward`` gives the loss.

    ``encoder``: a :class:`SwinTransformer` or ``SwinTransformerV2`` built with
    ``num_classes=0`` (no head). The mask token is registered on the encoder, where the
    release keeps it. ``norm_target`` / ``norm_target_window``: §3.4's normalised target.
    """

    def __init__(self, encoder: SwinTransformer, norm_target: bool = False, norm_target_window: int = 47) -> None:
        super().__init__()
        if encoder.num_classes != 0:
            raise ValueError("the SimMIM encoder must be built without a classifier (num_classes=0)")
        self.encoder = encoder
        encoder.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        trunc_normal_(encoder.mask_token, mean=0.0, std=0.02)
        self.patch_size = encoder.patch_embed.patch_size
        self.in_chans = encoder.patch_embed.in_chans
        # Each stage after the first halves the resolution: the last stage sees stride P·2^(L−1).
        self.encoder_stride = self.patch_size * 2 ** (encoder.num_layers - 1)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.encoder_stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )
        self.norm_target = norm_target
        self.norm_target_window = norm_target_window

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images and their (B, H/P, W/P) token mask → (B, F, H/S, W/S) features (S: stride)."""
        enc = self.encoder
        x = enc.add_position(replace_masked_tokens(enc.patch_embed(images), mask, enc.mask_token))
        for layer in enc.layers:
            x = layer(x)
        return enc.norm(x).permute(0, 3, 1, 2)

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The predicted image (B, C, H, W), in the target's space (normalised if ``norm_target``)."""
        return self.decoder(self.encode(images, mask))

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder is trained to output: the images, or their normalised form (§3.4)."""
        images = images.float()
        return normalise_targets(images, self.norm_target_window) if self.norm_target else images

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss of a batch (scalar, fp32).

        Args:
            images: (B, C, H, W), H and W multiples of the encoder stride.
            mask: (B, H/P, W/P), 1 = masked.
        """
        prediction = self.reconstruct(images, mask).float()
        return masked_l1_loss(self.target(images), prediction, pixel_mask(mask, self.patch_size))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"encoder." + n for n in self.encoder.no_weight_decay()} | {"encoder.mask_token"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return set(self.encoder.no_weight_decay_keywords())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def flops(self) -> int:
        """Multiply-accumulates of one forward pass: the encoder's plus the 1×1 decoder's."""
        H, W = self.encoder.img_size
        positions = (H // self.encoder_stride) * (W // self.encoder_stride)
        return self.encoder.flops() + positions * self.decoder[0].in_channels * self.decoder[0].out_channels
