"""`train.compile=true`: torch.compile of G and D works and computes what eager mode computes.

Cost on a 2-core CPU, measured with an empty inductor cache: a smoke-preset run with inductor takes ~130 s,
almost all of it compiling 4 graphs (G with and without grad, D with and without an input that needs grad).
The default suite therefore runs inductor on the layers that crashed it (the FIR resampling with its edge
padding, forward and backward, contiguous and channels_last) and the training step under torch.compile with
the `aot_eager` backend (Dynamo's capture and AOT autograd, no code generation); the full inductor training
run against eager is `-m slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retinagen.config import load_run_config, parse_overrides
from retinagen.networks.layers import Downsample2d, Upsample2d, replicate_pad1
from retinagen.training.checkpoint import latest_valid_checkpoint, load_checkpoint


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_replicate_pad1_equals_replicate_padding_in_values_and_gradients(shape, channels_last) -> None:
    x = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = replicate_pad1(a), F.pad(b, (1, 1, 1, 1), mode="replicate")
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


class _Resample(nn.Module):
    """Up, a 3x3 conv, down: the edge-padded FIR filters inside a graph, as in G and D."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = Upsample2d(), Downsample2d()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.leaky_relu(self.conv(self.up(x)), 0.2))


@pytest.mark.parametrize("channels_last", [False, True])
def test_inductor_compiles_the_fir_resampling_forward_and_backward(channels_last: bool) -> None:
    torch.manual_seed(0)
    net = _Resample()
    x = torch.randn(2, 4, 8, 8)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    compiled = torch.compile(net, backend="inductor", dynamic=False)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = net(xa), compiled(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    ya.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    yb.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def _cfg(data: Path, *extra: str):
    return load_run_config("synthfundus", preset="smoke", overrides=parse_overrides([f"data.path={data}", *extra]))


def _losses(run: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_losses(a: list[dict[str, float]], b: list[dict[str, float]], rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss/G", "loss/D", "info/L_info"):
            assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-5), (ra["step"], key, ra[key], rb[key])


@pytest.fixture()
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.compile with Dynamo's capture and AOT autograd but no code generation (seconds, not minutes)."""
    real, calls = torch.compile, []

    def compile_(model, **kwargs):  # noqa: ANN001, ANN202, ANN003
        calls.append(type(model).__name__)
        return real(model, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_)
    return calls


def test_compiled_training_steps_match_eager_and_resume_across_compile(
    synth_zip_16: Path, tmp_path: Path, aot_eager: list[str]
) -> None:
    from retinagen.training.loop import train

    train(_cfg(synth_zip_16), tmp_path / "eager", progress=False, max_steps=4)
    train(_cfg(synth_zip_16, "train.compile=true"), tmp_path / "compiled", progress=False, max_steps=4)
    assert sorted(aot_eager) == ["Discriminator", "StyleGenerator"]  # the run really compiled G and D
    _assert_same_losses(_losses(tmp_path / "eager"), _losses(tmp_path / "compiled"), rel=1e-4)
    ck = load_checkpoint(latest_valid_checkpoint(tmp_path / "compiled" / "checkpoints"))
    assert not [k for k in ck.tensors if "_orig_mod" in k]  # the plain modules' names: loadable either way
    eager_ck = load_checkpoint(latest_valid_checkpoint(tmp_path / "eager" / "checkpoints"))
    assert sorted(ck.tensors) == sorted(eager_ck.tensors)

    # Resume across the switch, both ways: compiled 4 + eager 4 and eager 4 + compiled 4 = eager 8.
    train(_cfg(synth_zip_16), tmp_path / "eager", progress=False, resume=True)
    train(_cfg(synth_zip_16), tmp_path / "compiled", progress=False, resume=True)
    other = tmp_path / "eager_then_compiled"
    train(_cfg(synth_zip_16), other, progress=False, max_steps=4)
    train(_cfg(synth_zip_16, "train.compile=true"), other, progress=False, resume=True)
    full = _losses(tmp_path / "eager")
    assert len(full) == 8
    _assert_same_losses(full, _losses(tmp_path / "compiled"), rel=1e-4)
    _assert_same_losses(full, _losses(other), rel=1e-4)


@pytest.mark.slow
def test_inductor_training_steps_match_eager(synth_zip_16: Path, tmp_path: Path) -> None:
    """The real thing: inductor (C++ on a CPU) for G and D, 4 steps, losses within float tolerance of eager."""
    from retinagen.training.loop import train

    train(_cfg(synth_zip_16), tmp_path / "eager", progress=False, max_steps=4)
    train(_cfg(synth_zip_16, "train.compile=true"), tmp_path / "compiled", progress=False, max_steps=4)
    _assert_same_losses(_losses(tmp_path / "eager"), _losses(tmp_path / "compiled"), rel=1e-3)
