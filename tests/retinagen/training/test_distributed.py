"""DDP on gloo: N processes compute what one process computes on the whole batch (the all-reduce proven by a
control without it), torchrun with one process, and stopping every process at the same step.

The loop's single-process tests are in test_loop.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from retinagen.training.checkpoint import latest_valid_checkpoint, load_checkpoint
from retinagen.training.loop import Trainer, train

from .test_loop import _cfg, _start_training

_WITH_THEN_WITHOUT_ALLREDUCE = """
import sys
import retinagen.training.loop as loop
from retinagen.cli import main
control, args = sys.argv.pop(1), sys.argv[1:]
if main(args) != 0:
    sys.exit(1)
loop.allreduce_grads = lambda module, world: None
args[args.index("--out") + 1] = control
sys.exit(main(args))
"""

# Minibatch-stddev groups of 2 tile each process's 2 images (see Trainer): with the smoke preset's
# default of 4, D's batch statistics would differ between 1 x 4 and 2 x 2 images by design.
_DDP_SET = ["model.mbstd_group=2"]


# A launcher that counts the all_reduce calls of the run it starts (written to the file in argv[1]).
_COUNT_ALLREDUCE = """
import atexit, sys
import torch.distributed as dist
calls, real, out = [0], dist.all_reduce, sys.argv.pop(1)
def counting(*args, **kwargs):
    calls[0] += 1
    return real(*args, **kwargs)
dist.all_reduce = counting
atexit.register(lambda: open(out, "w").write(str(calls[0])))
from retinagen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _torchrun_train(data: Path, out: Path, launcher: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *launcher,
           "train", "--preset", "smoke", "--data", str(data), "--out", str(out), "--set", *_DDP_SET]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(run: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A run's newest checkpoint: meta, and the parameters, buffers and Adam moments of G, D and G_ema.

    Left out: the mapping network's running means of w (``w_avg``, ``w_avg_class``). Each process
    tracks them from its own rows, as StyleGAN2-ADA does; they feed only the truncation trick, never a
    loss or a gradient, and the per-grade means of two half batches are not those of the whole batch."""
    ck = load_checkpoint(latest_valid_checkpoint(run / "checkpoints"))
    keep = {k: v for k, v in ck.tensors.items() if k.startswith(("G.", "D.", "G_ema.", "opt_"))}
    return ck.meta, {k: v for k, v in keep.items() if not k.endswith(("mapping.w_avg", "mapping.w_avg_class"))}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest absolute difference between same-named float tensors, and the name."""
    assert sorted(a) == sorted(b)
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a if a[k].is_floating_point())


def _rel_update_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> float:
    """|W_a - W_b| / |W_b - W_init| over G's and D's weights: how far two runs' updates disagree, relative to
    how far the updates went. Adam's first steps move a weight by about lr * sign(gradient), so a weight whose
    gradient is ~0 may go either way under another float summation order (oneDNN picks its convolution
    algorithm by batch size): the max difference of one weight can then reach 2 lr while this stays small."""
    names = [k for k in init if k in a and k in b and a[k].is_floating_point()]
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in names)
    den = sum(float((b[k].double() - init[k].double()).square().sum()) for k in names)
    return (num / den) ** 0.5


def _init_weights(cfg_args: tuple[Path, ...], folder: Path) -> dict[str, torch.Tensor]:
    init = Trainer(_cfg(*cfg_args, *_DDP_SET), folder, log=False)
    out = {f"G.{k}": v for k, v in init.G.state_dict().items()}
    out.update({f"D.{k}": v for k, v in init.D.state_dict().items()})
    return {k: v for k, v in out.items() if not k.endswith(("mapping.w_avg", "mapping.w_avg_class"))}


@pytest.fixture(scope="module")
def two_process_runs(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """2 gloo processes x 2 images: the run with the gradient all_reduce, and the control without it."""
    root = tmp_path_factory.mktemp("ddp")
    launcher = root / "with_then_without_allreduce.py"
    launcher.write_text(_WITH_THEN_WITHOUT_ALLREDUCE)
    _torchrun_train(synth_zip_16, root / "ddp", [str(launcher), str(root / "no_allreduce")])
    return root / "ddp", root / "no_allreduce"


@pytest.fixture(scope="module")
def one_process_run(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    train(_cfg(synth_zip_16, *_DDP_SET), run, progress=False)
    return run


def test_ddp_two_gloo_processes_on_half_batches_equal_one_process_on_the_whole_batch(
    synth_zip_16: Path, two_process_runs: tuple[Path, Path], one_process_run: Path, tmp_path: Path
) -> None:
    """2 processes x 2 images with the all_reduce = 1 process x 4 images: every process draws the global
    batch's latents, grades and noise and keeps its rows, and gradients are averaged over processes."""
    meta, ddp = _weights(two_process_runs[0])
    one_meta, one = _weights(one_process_run)
    assert meta["world_size"] == 2 and one_meta["world_size"] == 1
    assert meta["step"] == one_meta["step"] == 8 and meta["images_seen"] == one_meta["images_seen"] == 32
    # Float rounding only (a sum of two half-batch means vs one mean, convolutions of 2 rows vs 4, through 8
    # Adam steps); the control without the all-reduce below is two orders of magnitude further off.
    init = _init_weights((synth_zip_16,), tmp_path / "init")
    rel = _rel_update_diff(ddp, one, init)
    print(f"DDP vs one process: relative update difference {rel:.2e}, max {_max_diff(ddp, one)}")
    assert rel < 1e-2, (rel, _max_diff(ddp, one))  # measured 7.9e-4; without the all-reduce 0.77
    # The comparison has teeth: 8 steps moved the weights far more than that tolerance.
    start = {k: v for k, v in init.items() if k.startswith("G.")}
    assert _max_diff({k: one[k] for k in start}, start)[0] > 1e-2


def test_torchrun_with_one_process_runs_the_all_reduce_and_matches_a_plain_run(
    synth_zip_16: Path, one_process_run: Path, tmp_path: Path
) -> None:
    """`torchrun --nproc_per_node 1` joins a process group (gloo here, NCCL on a GPU) and averages gradients
    through it: the path a multi-GPU run takes, checked on one device; the weights are a plain run's."""
    launcher, count = tmp_path / "count.py", tmp_path / "calls.txt"
    launcher.write_text(_COUNT_ALLREDUCE)
    _torchrun_train(synth_zip_16, tmp_path / "one", [str(launcher), str(count)], nproc=1)
    assert int(count.read_text()) >= 8 * 2  # D and G phases of 8 steps at least (plus lazy R1 steps)
    meta, ran = _weights(tmp_path / "one")
    _, plain = _weights(one_process_run)
    # Float rounding only (1 thread there, the suite's threads here: another summation order).
    rel = _rel_update_diff(ran, plain, _init_weights((synth_zip_16,), tmp_path / "init"))
    assert meta["world_size"] == 1 and rel < 1e-2, (rel, _max_diff(ran, plain))


def test_ddp_without_the_gradient_all_reduce_does_not_match_one_process(
    synth_zip_16: Path, two_process_runs: tuple[Path, Path], one_process_run: Path, tmp_path: Path
) -> None:
    """The control for the test above: processes that each step on their own half batch end elsewhere."""
    meta, ddp = _weights(two_process_runs[1])
    assert meta["world_size"] == 2 and meta["step"] == 8
    _, one = _weights(one_process_run)
    rel = _rel_update_diff(ddp, one, _init_weights((synth_zip_16,), tmp_path / "init"))
    print(f"DDP without the all-reduce vs one process: relative update difference {rel:.2e}")
    assert rel > 1e-1, rel


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(synth_zip_16: Path, tmp_path: Path) -> None:
    """`kill PID` of one torchrun worker (or a scheduler that signals one task): every process must leave
    the loop at the same step and rank 0 must save; a process leaving alone left the other one waiting in
    the next gradient all_reduce."""
    import signal

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "retinagen.cli", "train", "--preset", "smoke", "--data", str(synth_zip_16), "--out", str(run),
           "--kimg", "100", "--set", *_DDP_SET, "--set", "train.workers=0"]
    proc = _start_training(cmd, env, run, timeout_s=180)
    try:
        workers = sorted(int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGTERM)  # one worker only, not the group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped:" in out and "resume with: retinagen train --resume" in out, out[-3000:]
    ck = latest_valid_checkpoint(run / "checkpoints")
    assert ck is not None and load_checkpoint(ck).meta["step"] > 0


def test_the_stop_decision_is_the_one_agreed_at_the_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal landing just after the step's agreement must not stop this process alone (the others would
    wait in the next all_reduce): the decision returned is the agreed one, the flag carries the signal on."""
    import signal

    import retinagen.training.loop as loop

    flag = loop._StopFlag()

    def all_reduce_then_signal(t: torch.Tensor, op: Any = None) -> None:
        flag.stop, flag.signum = True, int(signal.SIGTERM)  # the signal arrives right after the reduce

    monkeypatch.setattr(loop.dist, "all_reduce", all_reduce_then_signal)
    budget_hit, stop_now = loop._agree_on_stopping(False, flag, torch.device("cpu"))
    assert (budget_hit, stop_now) == (False, False)
    assert flag.stop  # acted on at the next step's agreement, by every process together
    monkeypatch.setattr(loop.dist, "all_reduce", lambda t, op=None: None)
    assert loop._agree_on_stopping(False, flag, torch.device("cpu")) == (False, True)


# A launcher that shortens the auto grade guide's training (the same on every process) and records, per
# process, the guide it trained with (the SHA-256 of the guide the trainer holds).
_SHORT_GUIDE = """
import atexit, os, sys
import retinagen.training.grade_guide as gg
import retinagen.training.loop as loop
gg.AUTO_EPOCHS, gg.AUTO_MIN_STEPS = 1, 0
out, seen = sys.argv.pop(1), []
real_init = loop.Trainer.__init__
def init(self, *a, **k):
    real_init(self, *a, **k)
    seen.append(self)
loop.Trainer.__init__ = init
atexit.register(lambda: seen and open(f"{out}.{os.environ['RANK']}", "w").write(seen[0].guide.sha256))
from retinagen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ddp_processes_train_with_the_one_auto_guide_the_run_keeps(synth_zip_16: Path, tmp_path: Path) -> None:
    """loss.grade_guide=auto with 2 processes: each trains alongside (none waits minutes at a barrier), the
    first writes RUN/grade_guide.*, and every process trains G against that file's guide."""
    from retinagen.fileio import sha256_file

    launcher, record = tmp_path / "short_guide.py", tmp_path / "guide_sha"
    launcher.write_text(_SHORT_GUIDE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           str(record), "train", "--preset", "smoke", "--data", str(synth_zip_16), "--out", str(run),
           "--set", *_DDP_SET, "--set", "loss.grade_guide=auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    guide = run / "grade_guide.safetensors"
    want = sha256_file(guide)
    assert [Path(f"{record}.{r}").read_text() for r in (0, 1)] == [want, want]
    meta, _ = _weights(run)
    assert meta["world_size"] == 2 and meta["grade_guide_sha256"] == want
    assert sorted(p.name for p in run.glob("grade_guide*")) == ["grade_guide.json", "grade_guide.safetensors"]
