"""SECURITY.md stays true: every claim cites tests, and every cited test exists.

SECURITY.md's format (described in its "How to read this file" section):

* ``## `` headings split it into sections. `NON_CLAIM_SECTIONS` hold prose; every other section holds
  only claims (and blank lines).
* A claim is a top-level bullet ``- **ID.** text`` (ID like ``DATA-1``), continued by indented lines,
  ending with ``Tested by: `tests/<path>.py::<test>`, ...``. Parametrized ids (``test_x[case]``) are
  accepted and stripped; every case counts.
* In the one section whose heading ends with `PENDING_SUFFIX`, a claim may say ``Tested by: PENDING``
  (claims whose tests are being written); nowhere else.

What is checked: the structure above; that each cited file exists under tests/ and defines the test
function (found with `ast`, at module level or in a ``Test*`` class), so renaming or deleting a test
breaks the build; that each claim cites at least one test the default suite runs (not marked ``slow`` or
``gpu``); that IDs are unique and the threat model names only existing ones. Also: the runtime code
never unpickles (DATA-5), the supported versions name the release in pyproject.toml (SUP-1), no e-mail
address is invented for reporting, and README.md points to SECURITY.md.
"""

from __future__ import annotations

import ast
import re
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECURITY_MD = REPO / "SECURITY.md"
SOURCE_ROOTS = ("retinagen", "clinical", "apps")

NON_CLAIM_SECTIONS = frozenset(
    {
        "How to read this file",
        "Threat model",
        "Updating dependencies",
        "What is not protected",
        "Reporting a vulnerability",
    }
)
PENDING_SUFFIX = "(claims awaiting tests)"
PENDING = "PENDING"

_CLAIM_START = re.compile(r"^- \*\*([A-Z]+-\d+)\.\*\* \S")
_CITATION = re.compile(r"^(tests/[A-Za-z0-9_/]+\.py)::([A-Za-z_]\w*)(?:::([A-Za-z_]\w*))?(\[[^\]]*\])?$")
_ID = re.compile(r"\b([A-Z]+-\d+)\b")


@dataclass(frozen=True)
class Claim:
    """One claim bullet: its ID, section, the text before ``Tested by:``, and its citations."""

    id: str
    section: str
    line: int
    text: str
    citations: tuple[str, ...]
    pending: bool


@dataclass(frozen=True)
class Section:
    title: str
    line: int
    lines: tuple[str, ...]


def _sections(text: str) -> list[Section]:
    """The ``## `` sections of the document, each with its lines (heading excluded)."""
    sections: list[Section] = []
    title, start, body = "", 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            if title:
                sections.append(Section(title, start, tuple(body)))
            title, start, body = line[3:].strip(), n, []
        elif title:
            body.append(line)
    if title:
        sections.append(Section(title, start, tuple(body)))
    return sections


def _parse_claims(section: Section) -> list[Claim]:
    """Split a claim section into bullets; raise AssertionError for anything that is not a claim."""
    bullets: list[tuple[int, list[str]]] = []
    for offset, line in enumerate(section.lines, 1):
        n = section.line + offset
        if not line.strip():
            continue
        if line.startswith("- "):
            bullets.append((n, [line]))
        elif line.startswith("  ") and bullets:
            bullets[-1][1].append(line)
        else:
            raise AssertionError(
                f"SECURITY.md line {n} (section {section.title!r}): only claim bullets may appear in a claim "
                f"section; prose belongs in one of {sorted(NON_CLAIM_SECTIONS)}: {line!r}"
            )
    claims = []
    for n, lines in bullets:
        m = _CLAIM_START.match(lines[0])
        assert m, f"SECURITY.md line {n}: a claim must start with '- **ID-n.** ', got {lines[0]!r}"
        text = " ".join(part.strip() for part in lines)
        assert text.count("Tested by:") == 1, (
            f"SECURITY.md line {n} ({m.group(1)}): needs exactly one 'Tested by:'"
        )
        claim_text, cited = text.split("Tested by:")
        body = claim_text[m.end() - 1 :].strip()
        assert len(body) > 20, f"{m.group(1)}: the claim says nothing"
        cited = cited.strip()
        pending = cited == PENDING
        citations: tuple[str, ...] = ()
        if not pending:
            citations = tuple(re.findall(r"`([^`]+)`", cited))
            leftover = re.sub(r"`[^`]+`", "", cited).replace(",", "").strip()
            assert citations and leftover == "", (
                f"{m.group(1)}: 'Tested by:' must list `path::test` items separated by commas, got {cited!r}"
            )
        claims.append(Claim(m.group(1), section.title, n, body, citations, pending))
    return claims


@cache
def _document() -> tuple[str, tuple[Section, ...], tuple[Claim, ...]]:
    assert SECURITY_MD.is_file(), "SECURITY.md is missing at the repository root"
    text = SECURITY_MD.read_text(encoding="utf-8")
    sections = tuple(_sections(text))
    claims = tuple(c for s in sections if s.title not in NON_CLAIM_SECTIONS for c in _parse_claims(s))
    return text, sections, claims


# --------------------------------------------------------------------------------------------------
# Finding cited tests


@dataclass(frozen=True)
class _TestDef:
    slow: bool


def _marks(decorators: list[ast.expr]) -> set[str]:
    """Names of pytest marks among decorators: ``@pytest.mark.slow`` -> {"slow"}."""
    out = set()
    for dec in decorators:
        node = dec.func if isinstance(dec, ast.Call) else dec
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "mark"
        ):
            out.add(node.attr)
    return out


def _module_marks(tree: ast.Module) -> set[str]:
    """Marks applied to a whole module through ``pytestmark = ...``."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            values = node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else [node.value]
            return _marks(list(values))
    return set()


@cache
def _tests_in(path: str) -> dict[str, _TestDef]:
    """``{"test_x": ..., "TestC::test_y": ...}`` for the test functions a file defines."""
    file = REPO / path
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    module_slow = bool(_module_marks(tree) & {"slow", "gpu"})
    found: dict[str, _TestDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            found[node.name] = _TestDef(module_slow or bool(_marks(node.decorator_list) & {"slow", "gpu"}))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            class_slow = module_slow or bool(_marks(node.decorator_list) & {"slow", "gpu"})
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith("test"):
                    slow = class_slow or bool(_marks(item.decorator_list) & {"slow", "gpu"})
                    found[f"{node.name}::{item.name}"] = _TestDef(slow)
    return found


def _resolve(citation: str) -> _TestDef:
    """The cited test's definition; AssertionError naming what is wrong when it does not exist."""
    m = _CITATION.match(citation)
    assert m, f"{citation!r} is not of the form tests/<path>.py::<test>[::<method>][<id>]"
    path, first, second, _param = m.groups()
    assert (REPO / path).is_file(), f"{citation}: file {path} does not exist"
    name = f"{first}::{second}" if second else first
    tests = _tests_in(path)
    assert name in tests, f"{citation}: {path} defines no test {name!r}"
    return tests[name]


# --------------------------------------------------------------------------------------------------
# The document's structure and citations


def test_security_md_has_claims_and_the_expected_sections() -> None:
    _, sections, claims = _document()
    titles = [s.title for s in sections]
    assert len(titles) == len(set(titles)), f"duplicate section headings: {titles}"
    missing = NON_CLAIM_SECTIONS - set(titles)
    assert not missing, f"SECURITY.md lacks the sections {sorted(missing)}"
    assert len(claims) >= 30
    for prefix in ("DATA", "DEC", "PATH", "PHI", "SYN", "WRITE", "UP", "DEP", "SUP"):
        assert any(c.id.startswith(prefix + "-") for c in claims), f"no {prefix}-n claims"


def test_every_claim_cites_tests_and_ids_are_unique() -> None:
    _, _, claims = _document()
    ids = [c.id for c in claims]
    assert len(ids) == len(set(ids)), f"duplicate claim ids: {sorted({i for i in ids if ids.count(i) > 1})}"
    for claim in claims:
        if claim.pending:
            assert claim.section.endswith(PENDING_SUFFIX), (
                f"{claim.id} (line {claim.line}) says 'Tested by: {PENDING}' outside a section whose "
                f"heading ends with {PENDING_SUFFIX!r}: every claim needs a test"
            )
        else:
            assert claim.citations, f"{claim.id} cites no test"


def test_every_cited_test_exists() -> None:
    _, _, claims = _document()
    problems = []
    for claim in claims:
        for citation in claim.citations:
            try:
                _resolve(citation)
            except AssertionError as exc:
                problems.append(f"{claim.id}: {exc}")
    assert problems == [], "SECURITY.md cites tests that do not exist:\n" + "\n".join(problems)


def test_every_claim_is_checked_by_the_default_suite() -> None:
    _, _, claims = _document()
    only_slow = [c.id for c in claims if c.citations and all(_resolve(t).slow for t in c.citations)]
    assert only_slow == [], f"claims proven only by slow/gpu tests (not run by default): {only_slow}"


def test_threat_model_names_only_existing_claims() -> None:
    _, sections, claims = _document()
    ids = {c.id for c in claims}
    (threat,) = [s for s in sections if s.title == "Threat model"]
    named = set(_ID.findall("\n".join(threat.lines)))
    assert named, "the threat model names no claims"
    assert named <= ids, f"the threat model names claims that do not exist: {sorted(named - ids)}"
    # Ranges "A-1 to A-5" must not skip past the last claim of that prefix either.
    for first, last in re.findall(r"\b([A-Z]+-\d+) to ([A-Z]+-\d+)\b", "\n".join(threat.lines)):
        prefix = first.split("-")[0]
        highest = max(int(i.split("-")[1]) for i in ids if i.startswith(prefix + "-"))
        assert int(last.split("-")[1]) == highest, (
            f"threat model range {first} to {last}; last {prefix} is {highest}"
        )


def test_the_parser_rejects_what_it_should() -> None:
    """The checks above can fail: malformed claims and missing tests are caught."""
    section = Section("X", 1, ("- **X-1.** A claim long enough to say something but citing nothing.",))
    with pytest.raises(AssertionError, match="exactly one 'Tested by:'"):
        _parse_claims(section)
    with pytest.raises(AssertionError, match="only claim bullets"):
        _parse_claims(Section("X", 1, ("Some prose in a claim section.",)))
    with pytest.raises(AssertionError, match="must start with"):
        _parse_claims(Section("X", 1, ("- an unnumbered bullet. Tested by: `tests/test_security_md.py::x`",)))
    with pytest.raises(AssertionError, match="separated by commas"):
        _parse_claims(
            Section("X", 1, ("- **X-1.** A claim long enough to say something. Tested by: a test",))
        )
    with pytest.raises(AssertionError, match="defines no test"):
        _resolve("tests/test_security_md.py::test_that_does_not_exist")
    with pytest.raises(AssertionError, match="does not exist"):
        _resolve("tests/no_such_file.py::test_x")
    assert _resolve("tests/test_security_md.py::test_the_parser_rejects_what_it_should[case]").slow is False
    assert _resolve("tests/retinagen/test_fuzz.py::test_long_fuzz_in_a_subprocess_with_a_hard_timeout").slow


# --------------------------------------------------------------------------------------------------
# Claims this file proves itself


def _code_tokens(path: Path) -> str:
    """The file's source without comments and string literals (docstrings may quote what code must not do)."""
    out = []
    with open(path, "rb") as fh:
        for tok in tokenize.tokenize(fh.readline):
            if tok.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.ENCODING):
                out.append(tok.string)
    return " ".join(out)


def _unsafe_loads(path: Path, base: Path = REPO) -> list[str]:
    """Calls in ``path`` that unpickle or construct arbitrary objects from a file, as ``FILE:LINE: what``
    (FILE relative to ``base``; LINE 0 for the token check, which has no single line)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    hits: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        kwargs = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        where = f"{path.relative_to(base)}:{node.lineno}"
        for key, value in kwargs.items():
            if key == "weights_only" and not (isinstance(value, ast.Constant) and value.value is True):
                hits.append(f"{where}: weights_only={ast.unparse(value)}")
            if key == "allow_pickle" and not (isinstance(value, ast.Constant) and value.value is False):
                hits.append(f"{where}: allow_pickle={ast.unparse(value)}")
        if owner == "torch" and name == "load" and "weights_only" not in kwargs:
            hits.append(f"{where}: torch.load without weights_only=True")
        if owner in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve") and name in (
            "load", "loads", "Unpickler", "open",
        ):  # fmt: skip
            hits.append(f"{where}: {owner}.{name}")
        if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "full_load_all"):
            hits.append(f"{where}: yaml.{name} (use yaml.safe_load)")
        if name in ("eval", "exec") and isinstance(func, ast.Name):
            hits.append(f"{where}: {name}()")
    if re.search(r"weights_only\s*=\s*False", _code_tokens(path)):
        hits.append(f"{path.relative_to(base)}:0: 'weights_only=False' in code")
    return hits


def test_runtime_code_never_unpickles_user_files() -> None:
    files = sorted(p for root in SOURCE_ROOTS for p in (REPO / root).rglob("*.py"))
    assert any(p.name == "checkpoint.py" for p in files)
    hits = [hit for p in files for hit in _unsafe_loads(p)]
    assert hits == [], "unsafe loading in runtime code:\n" + "\n".join(hits)


def test_the_unpickling_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "unsafe.py"
    bad.write_text(
        "import pickle, torch, yaml, numpy as np\n"
        "# torch.load(p, weights_only=False) in a comment is fine, as in a docstring\n"
        "a = torch.load(p)\n"
        "b = torch.load(p, weights_only=False)\n"
        "c = pickle.loads(data)\n"
        "d = np.load(p, allow_pickle=True)\n"
        "e = yaml.load(text, Loader=yaml.Loader)\n"
        "f = torch.load(p, weights_only=True)\n"
        "g = np.load(p, allow_pickle=False)\n"
        "h = yaml.safe_load(text)\n"
        '"""weights_only=False"""\n',
        encoding="utf-8",
    )
    hits = _unsafe_loads(bad, tmp_path)
    lines = sorted(int(h.split(":")[1]) for h in hits)
    assert lines == [0, 3, 4, 5, 6, 7], hits  # 0: the token check found line 4's code, not the comment/string
    text_only = tmp_path / "doc.py"
    text_only.write_text('x = 1  # weights_only=False\n"""weights_only=False"""\n', encoding="utf-8")
    assert _unsafe_loads(text_only, tmp_path) == []


def _pyproject_version() -> str:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    assert m, "no version in pyproject.toml"
    return m.group(1)


def test_supported_versions_name_the_current_release() -> None:
    _, sections, claims = _document()
    major, minor = _pyproject_version().split(".")[:2]
    (supported,) = [c for c in claims if c.section == "Supported versions"]
    assert f"{major}.{minor}.x" in supported.text, (
        f"SECURITY.md's supported versions do not name the current release line {major}.{minor}.x "
        "(pyproject.toml's version changed: update SECURITY.md)"
    )


def test_reporting_uses_a_private_advisory_and_no_invented_address() -> None:
    text, sections, _ = _document()
    (report,) = [s for s in sections if s.title == "Reporting a vulnerability"]
    body = "\n".join(report.lines)
    assert "private security advisory" in body
    assert "public issue" in body  # says not to use one
    assert not re.search(r"[\w.+-]+@[\w-]+\.[\w.]+", text), "SECURITY.md holds an e-mail address"


def test_readme_points_to_security_md() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "SECURITY.md" in readme, "README.md should link to SECURITY.md (threat model, reporting)"
