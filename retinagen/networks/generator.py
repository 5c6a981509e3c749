"""Generators of the MSI family: the style generator (S = 1) and the direct-input generator (S = 0).

Both take Z' [N, noise_dim], the code C [N, code_dim] (see `retinagen.latent`) and, when conditioned,
a DR grade [N], and return images [N, 3, R, R] roughly in [-1, 1] (no tanh, as in StyleGAN2).

* `StyleGenerator` (InfoStyleGAN, StyleGAN): a mapping network turns (Z', C) and the grade embedding into
  w, which modulates every convolution of a StyleGAN2 skip-architecture synthesis network. Style mixing is
  off: one w drives all layers (the paper turns mixing off because it hurts disentanglement).
* `DirectGenerator` (InfoGAN baseline): (Z', C, grade embedding) go straight into a linear layer and an
  upsampling conv stack with pixel norm; no mapping network, no styles. Same widths, same output.

Constructors take plain keyword arguments so a typed config can build them (`build_generator`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retinagen.latent import LatentSample, LatentSpec
from retinagen.networks.grow import GrowStage
from retinagen.networks.layers import (
    NOISE_MODES,
    EqualizedConv2d,
    EqualizedLinear,
    NoiseInjection,
    NoiseSource,
    PixelNorm,
    Upsample2d,
    lrelu,
    modulated_conv2d,
    normalize_2nd_moment,
)

MIN_RESOLUTION = 8
MAX_RESOLUTION = 1024


def check_resolution(resolution: int) -> int:
    """log2(resolution); raises ValueError unless it is a power of two in [8, 1024]."""
    if not isinstance(resolution, int) or resolution < MIN_RESOLUTION or resolution > MAX_RESOLUTION:
        raise ValueError(
            f"resolution must be a power of two in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}"
        )
    log2 = resolution.bit_length() - 1
    if 2**log2 != resolution:
        raise ValueError(f"resolution must be a power of two, got {resolution}")
    return log2


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    """Feature width at resolution ``res``: min(channel_base // res, channel_max), falling with resolution."""
    c = min(channel_base // res, channel_max)
    if c < 1:
        raise ValueError(f"channel_base={channel_base} leaves no channels at {res} px")
    return c


def check_grade(grade: torch.Tensor | None, n: int, num_classes: int, who: str, required: bool) -> None:
    """Validate a DR-grade batch [N] of integers in [0, num_classes).

    The value range is checked for CPU tensors only: on an accelerator it would force a host sync every
    step, and the one-hot encoding reports out-of-range labels itself there.
    """
    if num_classes == 0:
        if grade is not None:
            raise ValueError(f"{who} is unconditional (num_classes=0) but a grade was given")
        return
    if grade is None:
        if required:
            raise ValueError(f"{who} is conditioned on {num_classes} grades: pass grade [N] int64")
        return
    if grade.shape != (n,) or grade.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(
            f"{who}: grade must be an integer tensor [{n}], got {grade.dtype} {tuple(grade.shape)}"
        )
    # Skipped while torch.compile traces: reading a value is a graph break, and the trainer's grades are
    # drawn in range (fake) or checked when the dataset loads (real).
    in_range_check = grade.device.type == "cpu" and n and not torch.compiler.is_compiling()
    if in_range_check and (int(grade.min()) < 0 or int(grade.max()) >= num_classes):
        raise ValueError(
            f"{who}: grade values must lie in [0, {num_classes}), got {grade.min()}..{grade.max()}"
        )


CODE_INPUTS = ("balanced", "raw")


def standardize_code(code: torch.Tensor, latent: LatentSpec) -> torch.Tensor:
    """Code C [N, code_dim] in the `LatentSample.code` layout -> zero-mean, unit-variance features [N, code_dim].

    Under the prior every column gets mean 0 and variance 1: a one-hot block of k classes becomes
    (onehot - 1/k) * k / sqrt(k - 1), a Bernoulli bit b becomes 2b - 1, a uniform value u becomes
    sqrt(3) u. The maps are affine, so interpolated or extrapolated values (traversals) stay ordered.
    """
    if code.ndim != 2 or code.shape[1] != latent.code_dim:
        raise ValueError(f"code must be [N, {latent.code_dim}], got {tuple(code.shape)}")
    parts: list[torch.Tensor] = []
    start = 0
    for k in latent.categorical:
        parts.append((code[:, start : start + k] - 1.0 / k) * (k / math.sqrt(k - 1)))
        start += k
    nb = latent.n_bernoulli
    parts.append(code[:, start : start + nb] * 2.0 - 1.0)
    parts.append(code[:, start + nb :] * math.sqrt(3.0))
    return torch.cat(parts, dim=1)


def balanced_input(
    z_noise: torch.Tensor, code: torch.Tensor, latent: LatentSpec, noise_scale: float = 1.0
) -> torch.Tensor:
    """The ``code_input="balanced"`` latent input [N, z_dim] from Z' [N, noise_dim] and C [N, code_dim].

    Z' is normalised to unit second moment (per sample, as StyleGAN does with z) and the codes are
    standardised (`standardize_code`) and scaled so that both blocks carry the same expected energy,
    much as StyleGAN2-ADA concatenates a separately normalised class embedding to z. The code block is
    not normalised per sample (that would erase the overall magnitude of the uniform codes). A constant
    brings the whole to unit expected second moment; ``noise_scale`` then multiplies the noise block
    (truncation of the direct generator).

    Why (the alternative, ``code_input="raw"``, is concat(Z', C) with 0/1 bits and one-hot blocks): with
    108 unit-variance noise dims the 20 codes carry ~5 % of the input variance and the 10 discrete ones ~2 %
    (0.25 per bit, 0.22 per one-hot column), so at initialisation the codes barely move the image, Q cannot pick them out of the
    noise-driven variation and L_info stays at 0 for hundreds of steps; with Adam's ~lr-sized relative
    steps on equalized-lr weights G needs thousands of steps to amplify them (measured; see the tests).
    """
    nd, cd = latent.noise_dim, latent.code_dim
    # After scaling each block has expected energy nd; 2 nd over z_dim columns -> unit mean square.
    scale = math.sqrt(latent.z_dim / (2.0 * nd))
    noise = normalize_2nd_moment(z_noise) * (scale * noise_scale)
    c = standardize_code(code.to(z_noise.dtype), latent) * (math.sqrt(nd / cd) * scale)
    return torch.cat([noise, c], dim=1)


def check_code_input(code_input: str) -> str:
    if code_input not in CODE_INPUTS:
        raise ValueError(f"code_input must be one of {CODE_INPUTS}, got {code_input!r}")
    return code_input


# ------------------------------------------------------------------------------------------ mapping
class MappingNetwork(nn.Module):
    """z [N, z_dim] (+ grade [N]) -> w [N, w_dim] through ``num_layers`` equalized-lr FC layers.

    z is normalised to unit second moment (unless ``normalize_input=False``: the caller already scaled it,
    see `balanced_input`); with ``num_classes > 0`` a learned grade embedding (also
    normalised) is concatenated to it (DR-grade conditioning in the mapping network, as StyleGAN2-ADA).
    ``w_avg`` tracks an EMA of w (and ``w_avg_class`` one per grade) for the truncation trick; it is updated
    in training mode, or whenever ``update_w_avg=True``.
    """

    def __init__(
        self,
        z_dim: int,
        w_dim: int,
        num_layers: int = 8,
        num_classes: int = 0,
        embed_dim: int | None = None,
        lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
        normalize_input: bool = True,
    ) -> None:
        super().__init__()
        if z_dim < 1 or w_dim < 1 or num_layers < 1 or num_classes < 0:
            raise ValueError("MappingNetwork needs z_dim, w_dim, num_layers >= 1 and num_classes >= 0")
        self.z_dim = z_dim
        self.w_dim = w_dim
        self.num_classes = num_classes
        self.w_avg_beta = w_avg_beta
        self.normalize_input = normalize_input
        in_dim = z_dim
        if num_classes > 0:
            self.embed_dim = embed_dim or w_dim
            self.embed = EqualizedLinear(num_classes, self.embed_dim)
            in_dim += self.embed_dim
        else:
            self.embed_dim = 0
            self.embed = None
        dims = [in_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            EqualizedLinear(a, b, lr_multiplier=lr_multiplier, activation=True)
            for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.register_buffer("w_avg_class", torch.zeros(max(num_classes, 0), w_dim))

    def forward(
        self,
        z: torch.Tensor,
        grade: torch.Tensor | None = None,
        *,
        truncation_psi: float = 1.0,
        update_w_avg: bool | None = None,
    ) -> torch.Tensor:
        """z: [N, z_dim]; grade: [N] int or None -> w: [N, w_dim].

        truncation_psi < 1 pulls w towards the tracked average (the per-grade average when a grade is given).
        """
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"MappingNetwork expects z [N, {self.z_dim}], got {tuple(z.shape)}")
        check_grade(grade, z.shape[0], self.num_classes, "MappingNetwork", required=True)
        x = normalize_2nd_moment(z) if self.normalize_input else z
        onehot = None
        if self.embed is not None and grade is not None:
            onehot = F.one_hot(grade.long(), self.num_classes).to(x.dtype)
            x = torch.cat([x, normalize_2nd_moment(self.embed(onehot))], dim=1)
        for layer in self.layers:
            x = layer(x)
        if update_w_avg is None:
            update_w_avg = self.training
        if update_w_avg and x.shape[0] > 0:
            self._update_w_avg(x.detach(), onehot)
        if truncation_psi != 1.0:
            center = self.w_avg_class[grade.long()] if onehot is not None else self.w_avg.unsqueeze(0)
            x = center.to(x.dtype).lerp(x, truncation_psi)
        return x

    @torch.no_grad()
    def _update_w_avg(self, w: torch.Tensor, onehot: torch.Tensor | None) -> None:
        w = w.float()
        self.w_avg.copy_(w.mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if onehot is not None:
            oh = onehot.float()
            counts = oh.sum(dim=0)  # [K]
            means = (oh.t() @ w) / counts.clamp(min=1.0).unsqueeze(1)  # [K, w_dim]
            updated = means.lerp(self.w_avg_class, self.w_avg_beta)
            self.w_avg_class.copy_(torch.where((counts > 0).unsqueeze(1), updated, self.w_avg_class))


# ---------------------------------------------------------------------------------------- synthesis
class SynthesisLayer(nn.Module):
    """(optional 2x upsample) -> modulated 3x3 conv with demodulation -> noise -> bias -> lrelu."""

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)  # styles start at 1
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.weight_gain = 1.0 / (in_channels * 9) ** 0.5
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.up = Upsample2d() if up else None
        self.noise = NoiseInjection(resolution)

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str,
        noise_generator: NoiseSource | None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.up is not None:
            x = self.up(x)
        y = modulated_conv2d(x, self.weight * self.weight_gain, self.affine(w), demodulate=True)
        y = self.noise(y, noise_mode, noise_generator, noise)
        return lrelu(y + self.bias.to(y.dtype).reshape(1, -1, 1, 1))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB without demodulation (StyleGAN2), plus bias, no activation."""

    def __init__(self, in_channels: int, w_dim: int) -> None:
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(3, in_channels, 1, 1))
        self.weight_gain = 1.0 / in_channels**0.5
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = modulated_conv2d(x, self.weight * self.weight_gain, self.affine(w), demodulate=False)
        return y + self.bias.to(y.dtype).reshape(1, -1, 1, 1)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: [upsampling conv,] conv, toRGB added to the upsampled image.

    The 4x4 block starts from a learned constant and has one conv (StyleGAN2); later blocks have two.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.conv0 = None
        else:
            self.const = None
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution)
        self.torgb = ToRGB(out_channels, w_dim)
        self.img_up = Upsample2d() if resolution > 4 else None

    def layers(self) -> list[SynthesisLayer]:
        """The block's noise-injecting layers in the order the forward pass runs them."""
        return [layer for layer in (self.conv0, self.conv1) if layer is not None]

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        w: torch.Tensor,
        noise_mode: str,
        noise_generator: NoiseSource | None,
        noise: Sequence[torch.Tensor] | None = None,
        rgb_alpha: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``noise``: pre-drawn noise of this block's layers (`layers`), in order, or None.
        ``rgb_alpha``: a 0-d weight of this block's toRGB output (progressive growing's fade-in), or None."""
        it = iter(noise) if noise is not None else None
        if self.const is not None:
            x = self.const.to(w.dtype).unsqueeze(0).expand(w.shape[0], -1, -1, -1)
        else:
            assert x is not None and self.conv0 is not None
            x = self.conv0(x, w, noise_mode, noise_generator, next(it) if it is not None else None)
        x = self.conv1(x, w, noise_mode, noise_generator, next(it) if it is not None else None)
        rgb = self.torgb(x, w)
        if rgb_alpha is not None:
            rgb = rgb * rgb_alpha.to(rgb.dtype)
        img = rgb if img is None else self.img_up(img).to(rgb.dtype) + rgb
        return x, img


class SynthesisNetwork(nn.Module):
    """w [N, w_dim] -> img [N, 3, R, R]; the same w for every layer (style mixing off).

    With ``grade_classes`` > 0 each block adds a learned offset of w per grade (zero at start), so the
    grade also enters every resolution directly, not only through the mapping network. With ``grow_from``
    the network grows progressively (`retinagen.networks.grow`): blocks above the stage's resolution are
    skipped and the image upsampled to R, and the stage's own block fades in.
    """

    def __init__(
        self, w_dim: int, resolution: int, channel_base: int, channel_max: int, grade_classes: int = 0,
        grow_from: int | None = None,
    ) -> None:
        super().__init__()
        log2 = check_resolution(resolution)
        self.w_dim = w_dim
        self.resolution = resolution
        blocks = []
        in_ch = 0
        for res in (2**k for k in range(2, log2 + 1)):
            out_ch = channels_at(res, channel_base, channel_max)
            blocks.append(SynthesisBlock(in_ch, out_ch, w_dim, res))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.grade_classes = grade_classes
        self.grade_offsets = (
            nn.Parameter(torch.zeros(len(blocks), grade_classes, w_dim)) if grade_classes > 0 else None
        )
        self.grow = GrowStage(grow_from, resolution) if grow_from is not None else None

    def forward(
        self,
        w: torch.Tensor,
        *,
        noise_mode: str = "random",
        noise_generator: NoiseSource | None = None,
        noise: Sequence[torch.Tensor] | None = None,
        grade: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``noise``: the output of `draw_noise` (mode "random"), used instead of drawing in the layers.
        ``grade`` [N]: needed (and only used) when the network has per-block grade offsets."""
        if w.ndim != 2 or w.shape[1] != self.w_dim:
            raise ValueError(f"SynthesisNetwork expects w [N, {self.w_dim}], got {tuple(w.shape)}")
        if self.grade_offsets is not None:
            check_grade(grade, w.shape[0], self.grade_classes, "SynthesisNetwork", required=True)
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        counts = [len(block.layers()) for block in self.blocks]
        if noise is not None and len(noise) != sum(counts):
            raise ValueError(f"noise must hold {sum(counts)} tensors (one per noise layer), got {len(noise)}")
        x: torch.Tensor | None = None
        img: torch.Tensor | None = None
        start = 0
        for i, (block, k) in enumerate(zip(self.blocks, counts, strict=True)):
            part = noise[start : start + k] if noise is not None else None
            start += k
            rgb_alpha = None
            if self.grow is not None and block.resolution >= self.grow.res:
                if block.resolution > self.grow.res:  # not grown yet: the image is only upsampled
                    assert img is not None and block.img_up is not None
                    img = block.img_up(img)
                    continue
                rgb_alpha = self.grow.alpha if self.grow.fading else None
            wb = w
            if self.grade_offsets is not None and grade is not None:
                wb = w + self.grade_offsets[i][grade.long()].to(w.dtype)
            x, img = block(x, img, wb, noise_mode, noise_generator, part, rgb_alpha)
        assert img is not None
        return img

    def draw_noise(self, n: int, generator: NoiseSource | None, device: torch.device) -> list[torch.Tensor]:
        """Per-layer noise for n images, drawn from ``generator`` in the order the layers would draw it.

        ``forward(..., noise=draw_noise(n, g, dev))`` equals ``forward(..., noise_generator=g)``. The
        trainer draws eagerly and passes the tensors to the compiled network (see `NoiseInjection.draw`).
        """
        return [layer.noise.draw(n, generator, device) for block in self.blocks for layer in block.layers()]


# ----------------------------------------------------------------------------------------- generators
class _GeneratorBase(nn.Module):
    """Shared input checks and the `LatentSample` convenience entry point."""

    latent: LatentSpec
    resolution: int
    num_classes: int

    def _check_inputs(self, z_noise: torch.Tensor, code: torch.Tensor, grade: torch.Tensor | None) -> None:
        who = type(self).__name__
        if z_noise.ndim != 2 or z_noise.shape[1] != self.latent.noise_dim:
            raise ValueError(
                f"{who}: z_noise must be [N, {self.latent.noise_dim}], got {tuple(z_noise.shape)}"
            )
        if code.ndim != 2 or code.shape != (z_noise.shape[0], self.latent.code_dim):
            raise ValueError(
                f"{who}: code must be [{z_noise.shape[0]}, {self.latent.code_dim}], got {tuple(code.shape)}"
            )
        check_grade(grade, z_noise.shape[0], self.num_classes, who, required=True)

    def generate(
        self, sample: LatentSample, grade: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """``self(sample.z_noise, sample.code(), grade, **kwargs)`` with the sample's spec checked."""
        if sample.spec.z_dim != self.latent.z_dim or sample.spec.code_dim != self.latent.code_dim:
            raise ValueError("the latent sample's spec does not match this generator's")
        return self(sample.z_noise, sample.code(), grade, **kwargs)


class StyleGenerator(_GeneratorBase):
    """S = 1: mapping network + StyleGAN2 skip synthesis network.

    Args:
        latent: the latent spec; the mapping network's input is concat(Z', C) of width latent.z_dim.
        resolution: output size R, a power of two in [8, 1024].
        w_dim: width of w.
        mapping_layers: FC layers in the mapping network.
        channel_base, channel_max: width at resolution r is min(channel_base // r, channel_max).
        num_classes: number of DR grades to condition on (0 = unconditional).
        embed_dim: grade-embedding width (default w_dim).
        mapping_lr_multiplier: equalized-lr multiplier of the mapping network (StyleGAN: 0.01).
        code_input: how (Z', C) enter the mapping network: "balanced" (default; standardised codes with
            the same energy as the noise, see `balanced_input`) or "raw" (normalised concat(Z', C)).
        grade_entry: "mapping" (the grade embedding joins z) or "layers" (also a per-block learned
            offset of w per grade; see `SynthesisNetwork`).
        grow_from: train progressively from this resolution (`retinagen.networks.grow`); None: off.
    """

    def __init__(
        self,
        latent: LatentSpec,
        resolution: int,
        w_dim: int = 512,
        mapping_layers: int = 8,
        channel_base: int = 16384,
        channel_max: int = 512,
        num_classes: int = 0,
        embed_dim: int | None = None,
        mapping_lr_multiplier: float = 0.01,
        code_input: str = "balanced",
        grade_entry: str = "mapping",
        grow_from: int | None = None,
    ) -> None:
        super().__init__()
        check_resolution(resolution)
        self.code_input = check_code_input(code_input)
        if grade_entry not in ("mapping", "layers"):
            raise ValueError(f"grade_entry must be 'mapping' or 'layers', got {grade_entry!r}")
        self.grade_entry = grade_entry
        self.latent = latent
        self.resolution = resolution
        self.num_classes = num_classes
        self.w_dim = w_dim
        self.mapping = MappingNetwork(
            latent.z_dim,
            w_dim,
            num_layers=mapping_layers,
            num_classes=num_classes,
            embed_dim=embed_dim,
            lr_multiplier=mapping_lr_multiplier,
            normalize_input=self.code_input == "raw",
        )
        self.synthesis = SynthesisNetwork(
            w_dim, resolution, channel_base, channel_max,
            grade_classes=num_classes if grade_entry == "layers" else 0, grow_from=grow_from,
        )  # fmt: skip

    def forward(
        self,
        z_noise: torch.Tensor,
        code: torch.Tensor,
        grade: torch.Tensor | None = None,
        *,
        truncation_psi: float = 1.0,
        noise_mode: str = "random",
        noise_generator: NoiseSource | None = None,
        noise: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """z_noise: [N, noise_dim]; code: [N, code_dim]; grade: [N] int in [0, num_classes) when conditional.

        Returns img [N, 3, R, R], roughly in [-1, 1]. ``noise_mode`` "const" (fixed per-layer noise) or
        "random" with ``noise_generator`` makes the output a deterministic function of the inputs.
        ``noise`` (mode "random"): per-layer noise from `draw_noise`, instead of drawing it in the layers.
        """
        self._check_inputs(z_noise, code, grade)
        if self.code_input == "balanced":
            z = balanced_input(z_noise, code, self.latent)
        else:  # normalised by the mapping network
            z = torch.cat([z_noise, code.to(z_noise.dtype)], dim=1)
        w = self.mapping(z, grade, truncation_psi=truncation_psi)
        return self.synthesis(w, noise_mode=noise_mode, noise_generator=noise_generator, noise=noise, grade=grade)

    def draw_noise(self, n: int, generator: NoiseSource | None, device: torch.device) -> list[torch.Tensor]:
        """See `SynthesisNetwork.draw_noise`."""
        return self.synthesis.draw_noise(n, generator, device)


class DirectGenerator(_GeneratorBase):
    """S = 0 (InfoGAN baseline): concat(Z', C, grade embedding) -> FC to 4x4xC -> upsampling conv blocks.

    Each block: 2x upsample, two 3x3 equalized-lr convs with lrelu and pixel norm; a 1x1 toRGB per block
    summed over upsampled resolutions (the same skip output as `StyleGenerator`, same widths). No
    mapping network, no styles, no noise injection, so ``noise_mode``/``noise_generator`` have no effect
    (they are accepted for a common signature). ``truncation_psi`` scales Z' towards its mode 0; the
    codes are left as given. ``code_input`` as for `StyleGenerator` ("raw" = concat(Z', C) unnormalised,
    as in InfoGAN).
    """

    def __init__(
        self,
        latent: LatentSpec,
        resolution: int,
        channel_base: int = 16384,
        channel_max: int = 512,
        num_classes: int = 0,
        embed_dim: int | None = None,
        code_input: str = "balanced",
    ) -> None:
        super().__init__()
        log2 = check_resolution(resolution)
        self.code_input = check_code_input(code_input)
        self.latent = latent
        self.resolution = resolution
        self.num_classes = num_classes
        in_dim = latent.z_dim
        if num_classes > 0:
            self.embed_dim = embed_dim or 64
            self.embed = EqualizedLinear(num_classes, self.embed_dim)
            in_dim += self.embed_dim
        else:
            self.embed_dim = 0
            self.embed = None
        c4 = channels_at(4, channel_base, channel_max)
        self.c4 = c4
        self.fc = EqualizedLinear(in_dim, c4 * 16, activation=True)
        self.norm = PixelNorm()
        self.conv4 = EqualizedConv2d(c4, c4, 3, activation=True)
        self.torgb4 = EqualizedConv2d(c4, 3, 1)
        self.up = Upsample2d()
        blocks = []
        in_ch = c4
        for res in (2**k for k in range(3, log2 + 1)):
            out_ch = channels_at(res, channel_base, channel_max)
            blocks.append(
                nn.ModuleDict(
                    {
                        "conv0": EqualizedConv2d(in_ch, out_ch, 3, activation=True),
                        "conv1": EqualizedConv2d(out_ch, out_ch, 3, activation=True),
                        "torgb": EqualizedConv2d(out_ch, 3, 1),
                    }
                )
            )
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self,
        z_noise: torch.Tensor,
        code: torch.Tensor,
        grade: torch.Tensor | None = None,
        *,
        truncation_psi: float = 1.0,
        noise_mode: str = "random",
        noise_generator: NoiseSource | None = None,
        noise: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Same contract as `StyleGenerator.forward`: returns img [N, 3, R, R], roughly in [-1, 1]."""
        self._check_inputs(z_noise, code, grade)
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if noise:
            raise ValueError("DirectGenerator has no noise layers: noise must be empty or None")
        if self.code_input == "balanced":
            parts = [balanced_input(z_noise, code, self.latent, noise_scale=truncation_psi)]
        else:
            # Raw (Z', C) as in InfoGAN: Z' is already unit-variance; normalising the concatenation would
            # undo the truncation scaling.
            parts = [z_noise * truncation_psi, code.to(z_noise.dtype)]
        if self.embed is not None and grade is not None:
            parts.append(
                normalize_2nd_moment(self.embed(F.one_hot(grade.long(), self.num_classes).to(z_noise.dtype)))
            )
        n = z_noise.shape[0]
        x = self.fc(torch.cat(parts, dim=1)).reshape(n, self.c4, 4, 4)
        x = self.norm(self.conv4(self.norm(x)))
        img = self.torgb4(x)
        for block in self.blocks:
            x = self.norm(block["conv0"](self.up(x)))
            x = self.norm(block["conv1"](x))
            img = self.up(img) + block["torgb"](x)
        return img


    def draw_noise(self, n: int, generator: NoiseSource | None, device: torch.device) -> list[torch.Tensor]:
        """No noise layers: an empty list (the common signature of `StyleGenerator.draw_noise`)."""
        return []


STYLE_ONLY_KWARGS = ("w_dim", "mapping_layers", "mapping_lr_multiplier", "grade_entry")


def build_generator(style: bool, **kwargs: Any) -> StyleGenerator | DirectGenerator:
    """S = 1 -> `StyleGenerator(**kwargs)`; S = 0 -> `DirectGenerator(**kwargs)`.

    For S = 0 the style-only arguments (w_dim, mapping_layers, mapping_lr_multiplier, grade_entry) are dropped, so one
    config can build either variant; ``grow_from`` other than None is refused.
    """
    if style:
        return StyleGenerator(**kwargs)
    if kwargs.pop("grow_from", None) is not None:
        raise ValueError("progressive growing (grow_from) needs the style generator's skip synthesis network")
    return DirectGenerator(**{k: v for k, v in kwargs.items() if k not in STYLE_ONLY_KWARGS})
