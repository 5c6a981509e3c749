"""Building blocks shared by the generators and the discriminator (StyleGAN2-style, pure PyTorch).

* Equalized learning rate (Karras et al.): parameters are stored with unit-variance init and scaled at
  run time by 1/sqrt(fan_in), so Adam sees every layer at the same scale.
* Modulated convolution with demodulation, run as one grouped convolution over the batch.
* FIR [1, 3, 3, 1] resampling: 2x up = bilinear (align_corners=False), 2x down = blur + decimate.
* Noise injection with a learned strength, minibatch standard deviation, leaky ReLU with gain sqrt(2).

All layers work on CPU and CUDA and accept channels_last inputs (no `.view` on maybe-strided tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the activations' second moment ~1 through a leaky ReLU
NOISE_MODES = ("random", "const", "none")


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU (slope 0.2) times sqrt(2)."""
    return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale x so that its mean square along ``dim`` is 1 (StyleGAN's "pixel norm" of the latent)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class PixelNorm(nn.Module):
    """`normalize_2nd_moment` over channels of [N, C, H, W] (ProGAN), used by the direct generator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_2nd_moment(x, dim=1)


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalized learning rate.

    y = x @ (W * lr_multiplier / sqrt(in))^T + b * lr_multiplier, W ~ N(0, 1 / lr_multiplier^2) at init.
    The bias is stored divided by lr_multiplier so that its effective initial value is ``bias_init``.
    With ``activation`` the output goes through `lrelu`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_multiplier: float = 1.0,
        activation: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1 or lr_multiplier <= 0:
            raise ValueError("EqualizedLinear needs in/out_features >= 1 and lr_multiplier > 0")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = (
            nn.Parameter(torch.full([out_features], float(bias_init) / lr_multiplier)) if bias else None
        )
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"EqualizedLinear expects [..., {self.in_features}], got {tuple(x.shape)}")
        w = self.weight * self.weight_gain
        b = self.bias * self.bias_gain if self.bias is not None else None
        y = F.linear(x, w.to(x.dtype), b.to(x.dtype) if b is not None else None)
        return lrelu(y) if self.activation else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, lrelu={self.activation}"


class EqualizedConv2d(nn.Module):
    """Conv2d (stride 1, 'same' zero padding) with equalized learning rate: W * 1/sqrt(in * k * k)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("EqualizedConv2d needs an odd kernel size for 'same' padding")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_channels, H, W] -> [N, out_channels, H, W]."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"EqualizedConv2d expects [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        w = (self.weight * self.weight_gain).to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        y = F.conv2d(x, w, b, padding=self.kernel_size // 2)
        return lrelu(y) if self.activation else y

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, lrelu={self.activation}"


def _fir_kernel_2d() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k2 = torch.outer(k, k)
    return k2 / k2.sum()  # sums to 1


def replicate_pad1(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H + 2, W + 2], the border pixels repeated once on every side.

    The same values as ``F.pad(x, (1, 1, 1, 1), mode="replicate")``, built from edge slices and
    ``torch.cat`` instead. Why: under torch.compile (inductor, torch 2.14) the backward of
    ``replication_pad2d`` falls back to the eager kernel, which returns a channels_last gradient when
    inductor hands it a channels_last one, while the compiled graph expects a contiguous tensor - the
    step dies on a stride assertion. Slices and cat are ordinary ops that inductor lowers itself, in eager
    mode their backward is slicing and adds (deterministic on CUDA), and gradients equal the padding
    op's up to float rounding of the edge sums.
    """
    x = torch.cat([x[:, :, :, :1], x, x[:, :, :, -1:]], dim=3)
    return torch.cat([x[:, :, :1, :], x, x[:, :, -1:, :]], dim=2)


class Upsample2d(nn.Module):
    """2x upsampling with the [1, 3, 3, 1] FIR filter: exactly bilinear interpolation (align_corners=False).

    Implemented as a depthwise transposed convolution over an edge-replicated input: the interpolation
    weights (3/4, 1/4) are the even/odd taps of [1, 3, 3, 1] / 4. Unlike ``F.interpolate`` its backward
    pass is a plain convolution, which stays deterministic on CUDA.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", _fir_kernel_2d() * 4.0, persistent=False)  # gain 4 for zero insertion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, C, 2H, 2W]."""
        c = x.shape[1]
        w = self.kernel.to(x.dtype).expand(c, 1, 4, 4)
        return F.conv_transpose2d(replicate_pad1(x), w, stride=2, padding=3, groups=c)


class Downsample2d(nn.Module):
    """2x downsampling: [1, 3, 3, 1] FIR blur (edge-replicated) then keep every other pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", _fir_kernel_2d(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] (H, W even) -> [N, C, H/2, W/2]."""
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"Downsample2d needs even H and W, got {tuple(x.shape)}")
        c = x.shape[1]
        w = self.kernel.to(x.dtype).expand(c, 1, 4, 4)
        return F.conv2d(replicate_pad1(x), w, stride=2, groups=c)


def fused_modconv_default(x: torch.Tensor) -> bool:
    """Which form of `modulated_conv2d` is faster for input ``x``, by the measurement in the README's
    Throughput section: the ordinary convolution on scaled activations (False) whenever gradients are
    being computed, and on CUDA; the grouped per-sample convolution (True) only for a CPU forward without
    gradients at 64 x 64 px and above. A pure function of device, grad mode and size, so every run
    of one configuration takes the same form (exact resume stays bit-exact)."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    return x.shape[-1] * x.shape[-2] >= 64 * 64


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution, 'same' padding.

    Args:
        x: [N, I, H, W] input.
        weight: [O, I, k, k] (already scaled by the equalized-lr gain).
        styles: [N, I] per-sample input-channel scales.
        demodulate: rescale each sample's kernel to unit L2 norm per output channel, so unit-variance
            i.i.d. input gives unit-variance output.
        fused: True computes it as one grouped convolution with a per-sample kernel; False scales the
            activations instead - ``conv(x * s, w) * d`` - the same function as one ordinary batched
            convolution. None (default) picks per call with `fused_modconv_default`. The two agree to
            float rounding.

    Returns: [N, O, H, W] in x's dtype. The modulation and demodulation coefficients are computed in
    fp32 even under autocast (squares of bf16/fp16 weights under- and overflow).
    """
    n, i, h, w_ = x.shape
    o, wi, kh, kw = weight.shape
    if wi != i or styles.shape != (n, i):
        raise ValueError(
            f"modulated_conv2d: x {tuple(x.shape)}, weight {tuple(weight.shape)}, styles {tuple(styles.shape)} disagree"
        )
    if fused is None:
        fused = fused_modconv_default(x)
    if not fused:
        with torch.autocast(device_type=x.device.type, enabled=False):
            s32 = styles.float()
            d = None
            if demodulate:
                # sum_{i,k} (w[o,i,k] * s[n,i])^2 = (s^2 @ sum_k w^2 over the kernel taps)^T
                d = (s32.square() @ weight.float().square().sum(dim=(2, 3)).t() + eps).rsqrt()  # [N, O]
        y = F.conv2d(x * s32.to(x.dtype).reshape(n, i, 1, 1), weight.to(x.dtype), padding=kh // 2)
        if d is not None:
            y = y * d.to(y.dtype).reshape(n, o, 1, 1)
        return y
    with torch.autocast(device_type=x.device.type, enabled=False):
        wmod = weight.float().unsqueeze(0) * styles.float().reshape(n, 1, i, 1, 1)  # [N, O, I, k, k]
        if demodulate:
            dd = (wmod.square().sum(dim=(2, 3, 4)) + eps).rsqrt()  # [N, O]
            wmod = wmod * dd.reshape(n, o, 1, 1, 1)
    xg = x.reshape(1, n * i, h, w_)
    y = F.conv2d(xg, wmod.reshape(n * o, i, kh, kw).to(x.dtype), padding=kh // 2, groups=n)
    return y.reshape(n, o, h, w_)


@dataclass(frozen=True)
class BatchNoise:
    """Noise for rows [start, start + n) of a batch of ``batch`` rows, drawn from ``generator``.

    Every noise layer draws the whole batch's noise and keeps these rows, so a data-parallel process that
    computes one slice of a global batch adds to each image the same noise as one process computing the
    whole batch (the draws of a CPU generator cannot be skipped ahead). The extra draws are one channel
    per layer, small next to the layer's activations.
    """

    generator: torch.Generator
    start: int
    batch: int


# What the generators accept as ``noise_generator``: a generator (the batch is the whole batch) or a slice.
NoiseSource = torch.Generator | BatchNoise


class NoiseInjection(nn.Module):
    """Adds per-pixel Gaussian noise times a learned scalar strength (initialised to 0).

    noise_mode: "random" draws fresh noise (from ``generator`` when given: deterministic per seed; drawn on
    the generator's device and moved; a `BatchNoise` draws its batch and keeps its rows), "const" uses a
    fixed buffer saved with the model, "none" adds nothing.
    """

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def draw(self, n: int, generator: NoiseSource | None, device: torch.device) -> torch.Tensor:
        """The fresh noise [n, 1, R, R] (float32, on ``device``) that mode "random" adds to n images.

        The trainer calls this outside torch.compile and passes the result as ``noise``: a draw from a
        ``torch.Generator`` cannot be traced, and would split the compiled generator at every layer.
        """
        r = self.resolution
        if isinstance(generator, BatchNoise):
            if not 0 <= generator.start <= generator.start + n <= generator.batch:
                raise ValueError(
                    f"rows [{generator.start}, {generator.start + n}) outside a batch of {generator.batch}"
                )
            g = generator.generator
            full = torch.randn(generator.batch, 1, r, r, generator=g, device=g.device)
            return full[generator.start : generator.start + n].to(device)
        src = generator.device if generator is not None else device
        return torch.randn(n, 1, r, r, generator=generator, device=src).to(device)

    def forward(
        self,
        x: torch.Tensor,
        noise_mode: str = "random",
        generator: NoiseSource | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [N, C, R, R]; ``noise`` [N, 1, R, R]: noise drawn beforehand (`draw`), for mode "random" only."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if noise is not None and noise_mode != "random":
            raise ValueError(f"pre-drawn noise is added in noise_mode 'random' only, not {noise_mode!r}")
        if noise_mode == "none":
            return x
        n, _, h, w = x.shape
        if (h, w) != (self.resolution, self.resolution):
            raise ValueError(f"NoiseInjection({self.resolution}) got a {h}x{w} input")
        if noise_mode == "const":
            noise = self.noise_const.expand(n, 1, h, w)
        elif noise is None:
            noise = self.draw(n, generator, x.device)
        elif noise.shape != (n, 1, h, w):
            raise ValueError(f"NoiseInjection({self.resolution}): noise must be [{n}, 1, {h}, {w}], got {tuple(noise.shape)}")
        return x + noise.to(x.device, x.dtype) * self.strength.to(x.dtype)


class MinibatchStdDev(nn.Module):
    """Appends the within-group standard deviation of features as extra channels (ProGAN/StyleGAN2).

    Samples are split into consecutive groups of ``group_size``. When N is not a multiple of it, the last
    group is smaller; a last group of one sample is merged into the previous group (a single sample has no
    spread). With N = 1 the statistic is ~0. Output: [N, C + num_channels, H, W].
    """

    def __init__(self, group_size: int = 4, num_channels: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        if group_size < 1 or num_channels < 1:
            raise ValueError("MinibatchStdDev needs group_size >= 1 and num_channels >= 1")
        self.group_size = group_size
        self.num_channels = num_channels
        self.eps = eps

    def group_ids(self, n: int, device: torch.device) -> torch.Tensor:
        """[N] int64 group index of each sample."""
        ids = torch.arange(n, device=device) // self.group_size
        if n > 1 and n % self.group_size == 1:
            ids[-1] = ids[-2]
        return ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        f = self.num_channels
        if c % f:
            raise ValueError(f"MinibatchStdDev: {c} channels not divisible into {f} statistics")
        ids = self.group_ids(n, x.device)
        # Computed on the host: no device sync, no data-dependent shape for torch.compile.
        n_groups = -(-n // self.group_size) - (1 if n > 1 and n % self.group_size == 1 else 0)
        onehot = F.one_hot(ids, n_groups).to(torch.float32).transpose(0, 1)  # [G, N]
        counts = onehot.sum(dim=1, keepdim=True)  # [G, 1]
        y = x.float().reshape(n, -1)  # [N, C*H*W]
        mean = (onehot @ y) / counts  # [G, CHW]
        var = (onehot @ (y - mean[ids]).square()) / counts  # population variance per group
        std = (var + self.eps).sqrt().reshape(n_groups, f, -1).mean(dim=2)  # [G, F]
        stat = std[ids].to(x.dtype).reshape(n, f, 1, 1).expand(n, f, h, w)
        return torch.cat([x, stat], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"
