"""Tests for claims in SECURITY.md that no other test proves on its own.

Each test here is cited by a claim in SECURITY.md (``tests/test_security_md.py`` checks that every
citation resolves). What they add to the package tests:

* a pickle whose unpickling would *run code* (it creates a marker file) is given to every loader of
  user-supplied model files, with a matching sidecar JSON so only the pickle check can stop it; the
  marker must not appear, and the test then proves the payload is live by unpickling it itself;
* the same for the Inception weights file (the one file torch-fidelity unpickles), the real-data
  statistics cache and YAML configs (``!!python`` tags);
* image inputs in formats Pillow could parse but retinagen does not accept, special files (a FIFO),
  and a deflate "zip bomb" DICOM are refused without decoding;
* the dependency policy: lower bounds in pyproject, no import of an undeclared distribution, no
  network or download call in the runtime code, and no network use when building every network.

All fast (well under a second each, except building the grader networks, about 2 s).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import json
import os
import pickle
import re
import socket
import struct
import sys
import time
import tracemalloc
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinagen.errors import CheckpointError, ConfigError, DicomError, ImageDecodeError

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("retinagen", "clinical", "apps")
FIRST_PARTY = {"retinagen", "clinical", "apps", "tests"}


# --------------------------------------------------------------------------------------------------
# Live pickle payloads


class _RunsCode:
    """Unpickling an instance runs ``exec(code)``: the shape of a malicious checkpoint."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (self.code,))


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _torch_save_payload(path: Path, marker: Path) -> Path:
    """A ``torch.save`` file (a ZIP holding a pickle) whose loading with weights_only=False runs code."""
    torch.save({"w": torch.zeros(2), "x": _RunsCode(_marker_code(marker))}, path)
    return path


def _raw_pickle_payload(path: Path, marker: Path) -> Path:
    """A plain pickle stream (``pickle.dump``; old ``.pkl`` checkpoints) that runs code when loaded."""
    path.write_bytes(pickle.dumps({"w": _RunsCode(_marker_code(marker))}, protocol=4))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sidecar(tensor_path: Path, **meta: object) -> None:
    """A JSON sidecar whose recorded sha256 matches the payload, so a hash check cannot be what stops it."""
    full = {"schema_version": 1, "schema": 1, "tensors_sha256": _sha256(tensor_path), **meta}
    tensor_path.with_suffix(".json").write_text(json.dumps(full), encoding="utf-8")


def _assert_payload_is_live(payload: Path, marker: Path, *, raw: bool) -> None:
    """The test's own premise: the file really runs code when a full unpickler loads it."""
    assert not marker.exists()
    if raw:
        pickle.loads(payload.read_bytes())
    else:
        # A .pt copy: torch >= 2.10 hands files named *.safetensors to the safetensors reader instead.
        copy = payload.with_name("premise.pt")
        copy.write_bytes(payload.read_bytes())
        torch.load(copy, map_location="cpu", weights_only=False)  # the test's premise only, never the project
    assert marker.exists(), "the payload did not run: the test would prove nothing"
    marker.unlink()


@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_pickle_payloads_never_run_in_any_model_file_loader(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clinical.anomaly import SCORER_FORMAT, SCORER_VERSION, load_scorer
    from clinical.grader import GRADER_FORMAT, GRADER_VERSION, load_grader
    from retinagen.cli import main
    from retinagen.generation import load_model
    from retinagen.metrics.encoder import load_fundus_encoder
    from retinagen.training.checkpoint import load_checkpoint

    marker = tmp_path / "ran.txt"
    make = _torch_save_payload if kind == "torch_save" else _raw_pickle_payload
    evil = make(tmp_path / "evil.safetensors", marker)
    _sidecar(
        evil, format=SCORER_FORMAT, version=SCORER_VERSION, config={}, grader_format=GRADER_FORMAT,
        grader_version=GRADER_VERSION,
    )  # fmt: skip

    loaders = {
        "load_checkpoint": lambda: load_checkpoint(evil),
        "load_checkpoint(json)": lambda: load_checkpoint(evil.with_suffix(".json")),
        "load_model": lambda: load_model(evil),
        "load_scorer": lambda: load_scorer(evil),
        "load_grader": lambda: load_grader(evil),
        "load_fundus_encoder": lambda: load_fundus_encoder(evil),
    }
    for name, load in loaders.items():
        with pytest.raises(CheckpointError, match="refused") as info:
            load()
        assert "pickle" in str(info.value) or "not safetensors" in str(info.value), name
        assert not marker.exists(), f"{name} ran the pickle's code"

    # The command line: exit 2 with one error line, nothing run, nothing written.
    out = tmp_path / "gen"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(evil), "--n", "1", "--out", str(out)]) == 2
    assert "refused" in capsys.readouterr().err
    assert main(["anomaly", "score", "--scorer", str(evil), str(evil), "--out", str(tmp_path / "s.csv")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not out.exists() and not (tmp_path / "s.csv").exists()

    _assert_payload_is_live(evil, marker, raw=kind == "raw_pickle")


def test_inception_weights_that_would_run_code_never_reach_the_full_unpickler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch-fidelity unpickles the Inception file fully; retinagen first loads it with weights_only=True.

    The hash-prefix check is patched to accept the payload (an attacker can match 8 hex digits), so the
    restricted load is what must stop it.
    """
    import retinagen.metrics.extractors as fidmod

    marker = tmp_path / "ran.txt"
    evil = _torch_save_payload(tmp_path / fidmod.INCEPTION_WEIGHTS_FILENAME, marker)
    monkeypatch.setattr(fidmod, "INCEPTION_SHA256_PREFIX", _sha256(evil)[:8])
    monkeypatch.setenv(fidmod.INCEPTION_ENV_VAR, str(evil))
    with pytest.raises(fidmod.MetricUnavailable, match="plain tensors"):
        fidmod.verify_inception_weights(evil)
    with pytest.raises(fidmod.MetricUnavailable, match="plain tensors"):
        fidmod.create_extractor("inception-v3")
    assert not marker.exists()
    _assert_payload_is_live(evil, marker, raw=False)


def test_a_pickled_statistics_cache_file_is_a_miss_and_never_unpickled(tmp_path: Path) -> None:
    from retinagen.metrics.fid import StatsCache

    marker = tmp_path / "ran.txt"
    cache = StatsCache(tmp_path / "stats")
    key = "ab" * 32
    path = cache.path(key)
    path.parent.mkdir(parents=True)
    payload = np.empty(1, dtype=object)
    payload[0] = _RunsCode(_marker_code(marker))
    with open(path, "wb") as fh:  # every array present, "mu" an object array (stored as a pickle)
        np.savez(fh, key=np.array(key), mu=payload, sigma=np.eye(2), n=np.array(3))
    assert cache.load(key) is None  # a miss: recomputed, not unpickled
    assert not marker.exists()
    with np.load(path, allow_pickle=True) as z:  # the premise: the file does carry a live pickle
        z["mu"]
    assert marker.exists()


@pytest.mark.parametrize("where", ["file", "override"])
def test_yaml_configs_cannot_construct_python_objects(where: str, tmp_path: Path) -> None:
    from retinagen.config import parse_overrides, read_yaml

    marker = tmp_path / "ran.txt"
    tag = f'!!python/object/apply:builtins.exec ["{_marker_code(marker)}"]'
    with pytest.raises(ConfigError) as info:
        if where == "file":
            cfg = tmp_path / "evil.yaml"
            cfg.write_text(f"train:\n  kimg: {tag}\n", encoding="utf-8")
            read_yaml(cfg)
        else:
            parse_overrides([f"train.kimg={tag}"])
    assert "YAML" in str(info.value) or "bad value" in str(info.value)
    assert not marker.exists()


def test_grader_checkpoints_name_a_registered_architecture_never_a_class_path(tmp_path: Path) -> None:
    from clinical.grader import GRADER_FORMAT, GRADER_VERSION, load_grader
    from retinagen.training.checkpoint import save_checkpoint

    meta = {"format": GRADER_FORMAT, "grader_version": GRADER_VERSION, "resolution": 32, "num_classes": 5}
    for arch in ("builtins.exec", "torch.nn.Linear", "os:system"):
        path = save_checkpoint(tmp_path / "g", {"net.w": torch.zeros(2)}, {**meta, "arch": arch})
        with pytest.raises(CheckpointError, match="unknown grader architecture"):
            load_grader(path)


# --------------------------------------------------------------------------------------------------
# Image inputs Pillow could parse but retinagen does not accept


def _pillow_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("PCX", None),
        ("TGA", None),
        ("ICO", None),
        ("SGI", None),
        # Encapsulated PostScript: Pillow would hand it to Ghostscript (an external interpreter).
        ("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"),
    ],
)
def test_formats_outside_the_allow_list_are_refused_unparsed(
    fmt: str, data: bytes | None, tmp_path: Path
) -> None:
    from retinagen.data.imageio import read_image

    raw = data if data is not None else _pillow_bytes(fmt)
    with Image.open(io.BytesIO(raw)) as im:  # the premise: Pillow itself would open it
        assert im.format == fmt
    for name in (f"x.{fmt.lower()}", "x.png", "x.jpeg"):  # the extension does not matter
        p = tmp_path / name
        p.write_bytes(raw)
        with pytest.raises(ImageDecodeError, match="not an image"):
            read_image(p)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width x height`` RGB pixels, with no image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + crc


def test_default_image_pixel_limit_is_64_megapixels(tmp_path: Path) -> None:
    """Just over 64 MP is refused from the header with the default limit; the limit, not the decoder, says so."""
    from retinagen.data.imageio import DEFAULT_MAX_PIXELS, read_image

    assert DEFAULT_MAX_PIXELS == 64_000_000
    over = tmp_path / "over.png"
    over.write_bytes(_png_header_only(8001, 8000))
    with pytest.raises(
        ImageDecodeError, match=r"8001 x 8000 = 64,008,000 pixels exceeds the limit of 64,000,000"
    ):
        read_image(over)
    under = tmp_path / "under.png"  # 64 MP exactly passes the limit and fails later, as the empty file it is
    under.write_bytes(_png_header_only(8000, 8000))
    with pytest.raises(ImageDecodeError) as info:
        read_image(under)
    assert "exceeds the limit" not in info.value.reason


def test_special_files_are_refused_without_being_opened(tmp_path: Path) -> None:
    """A FIFO would block a reader forever (nobody writes to it); it is refused from its stat()."""
    from retinagen.data.dicom import read_dicom
    from retinagen.data.imageio import read_image

    fifo = tmp_path / "eye.png"
    os.mkfifo(fifo)
    dcm = tmp_path / "eye.dcm"
    os.mkfifo(dcm)
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        read_image(fifo)
    with pytest.raises(DicomError, match="not a regular file"):
        read_dicom(dcm)
    with pytest.raises(ImageDecodeError, match="not a regular file"):  # stat() runs before DICOM dispatch
        read_image(dcm)
    assert time.perf_counter() - t0 < 2.0


def _deflate_bomb_dicom(path: Path, inflated_mib: int = 48) -> Path:
    """A DICOM file whose Deflated Explicit VR body inflates to ``inflated_mib`` MiB of zeros."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as the transfer syntax says
    # One private OB element holding the zeros: a reader that inflates it allocates it in one piece and
    # parses one element (a body of bare zeros would be millions of empty elements: minutes to parse).
    size = inflated_mib << 20
    buf.write(deflater.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, size)))
    chunk = b"\x00" * (1 << 20)
    for _ in range(inflated_mib):
        buf.write(deflater.compress(chunk))
    buf.write(deflater.flush())
    path.write_bytes(buf.getvalue())
    return path


def test_deflate_bomb_dicom_is_refused_without_inflating(tmp_path: Path) -> None:
    from retinagen.data.dicom import read_dicom
    from retinagen.data.imageio import read_image

    bomb = _deflate_bomb_dicom(tmp_path / "bomb.dcm")
    # Under 1 MiB on disk, 48 MiB inflated: 3x the peak allowed below, and small enough that the test
    # fails in seconds, not minutes, if the refusal is ever removed (pydicom would inflate it).
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        for read in (read_dicom, read_image):
            with pytest.raises(DicomError, match="Deflated Explicit VR Little Endian"):
                read(bomb)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated: the body was inflated"
    assert elapsed < 2.0


# --------------------------------------------------------------------------------------------------
# Dependency policy


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def _requirements() -> dict[str, list[tuple[str, str]]]:
    """``{"runtime": [(name, specifier), ...], "<extra>": [...]}`` from pyproject.toml."""
    project = _pyproject()["project"]
    groups = {"runtime": project["dependencies"], **project.get("optional-dependencies", {})}
    out: dict[str, list[tuple[str, str]]] = {}
    for group, reqs in groups.items():
        for req in reqs:
            m = _REQ.match(req.split(";")[0])
            assert m, req
            out.setdefault(group, []).append((_normalise(m.group(1)), m.group(3).strip()))
    return out


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def test_every_dependency_has_a_lower_bound_that_the_installed_version_meets() -> None:
    reqs = _requirements()
    assert reqs["runtime"], "no runtime dependencies found"
    for group, items in reqs.items():
        for name, spec in items:
            m = re.search(r">=\s*([0-9][0-9a-zA-Z.]*)", spec)
            assert m, f"{name} ({group}) has no lower bound (>=) in pyproject.toml: {spec!r}"
            assert "==" not in spec and "<" not in spec, f"{name}: exact or upper pins block security fixes"
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                if group == "runtime":
                    raise AssertionError(f"runtime dependency {name} is not installed") from None
                continue  # an optional extra that is not installed here
            assert _version_tuple(installed) >= _version_tuple(m.group(1)), (name, installed, spec)


def _source_files(roots: tuple[str, ...] = SOURCE_ROOTS) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def _imported_top_level_modules(roots: tuple[str, ...]) -> dict[str, set[str]]:
    """Every module imported anywhere under ``roots`` (inside functions too) -> files importing it."""
    found: dict[str, set[str]] = {}
    for path in _source_files(roots):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_runtime_code_imports_only_declared_distributions() -> None:
    """retinagen/ and clinical/ need only the runtime dependencies; apps/ may also use a declared extra
    (a dashboard extra), never the test extra."""
    reqs = _requirements()
    runtime = {name for name, _ in reqs["runtime"]}
    extras = {name for group, items in reqs.items() if group not in ("runtime", "test") for name, _ in items}
    owners = metadata.packages_distributions()
    undeclared: list[str] = []
    for roots, allowed in ((("retinagen", "clinical"), runtime), (("apps",), runtime | extras)):
        for module, files in sorted(_imported_top_level_modules(roots).items()):
            if module in sys.stdlib_module_names or module in FIRST_PARTY:
                continue
            dists = {_normalise(d) for d in owners.get(module, [])}
            if not dists & allowed:
                undeclared.append(
                    f"{module} (distribution {sorted(dists) or 'not installed'}) in {sorted(files)}"
                )
    assert undeclared == [], "imported but not declared in pyproject.toml: " + "; ".join(undeclared)


# Calls and modules that fetch from the network. Runtime code must not use any of them: weights come from
# local files the user names, and every network is built without pretrained weights.
_NETWORK_MODULES = {
    "requests",
    "httpx",
    "urllib3",
    "aiohttp",
    "ftplib",
    "http",
    "socket",
    "huggingface_hub",
    "gdown",
}
_NETWORK_CALLS = {
    "urlopen", "urlretrieve", "load_state_dict_from_url", "download_url", "download_url_to_file",
    "download_and_extract", "download_and_extract_archive", "hf_hub_download", "snapshot_download",
    "load_url",
}  # fmt: skip


def test_runtime_code_has_no_download_or_network_calls() -> None:
    hits: list[str] = []
    for path in _source_files():
        rel = path.relative_to(REPO)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                mods += (
                    [f"{node.module}.{a.name}" for a in node.names]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for mod in mods:
                    parts = mod.split(".")
                    if parts[0] in _NETWORK_MODULES or parts[:2] == ["urllib", "request"]:
                        hits.append(f"{rel}:{node.lineno} imports {mod}")
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in _NETWORK_CALLS:
                    hits.append(f"{rel}:{node.lineno} calls {name}")
                if (
                    isinstance(func, ast.Attribute) and func.attr == "load"
                    and isinstance(func.value, ast.Attribute) and func.value.attr == "hub"
                ):  # fmt: skip
                    hits.append(f"{rel}:{node.lineno} calls torch.hub.load")
                for kw in node.keywords:  # pretrained=True / weights="IMAGENET..." download weights
                    if kw.arg == "pretrained" and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is False
                    ):
                        hits.append(f"{rel}:{node.lineno} passes pretrained={ast.unparse(kw.value)}")
    assert hits == []


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any attempt to resolve a host name or open a connection is recorded and fails."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise OSError("network access attempted during a test of offline operation")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_networks_and_metrics_are_built_offline(
    no_network: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retinagen.metrics.fid as fidmod
    from clinical.grader import ARCHITECTURES

    for name, build in ARCHITECTURES.items():
        net = build(5)
        assert sum(p.numel() for p in net.parameters()) > 0, name
    monkeypatch.delenv(fidmod.INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(
        fidmod.MetricUnavailable, match="--inception-weights"
    ):  # a clear error, not a download
        fidmod.create_extractor("inception-v3")
    assert no_network == []
