"""The README's Layout section names every module of the product, so a newcomer's map matches the tree."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("retinagen", "clinical", "apps")
# Folders the Layout block uses as row headings: their modules must be named one by one.
HEADINGS = {"data", "networks", "training", "metrics", "assets"}


def layout_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Layout" in text, "README.md has no Layout section"
    return text.split("## Layout", 1)[1].split("```", 2)[1]


def unlisted_modules(block: str) -> list[str]:
    """Product modules the block names neither by file name nor by a (non-heading) package folder above them."""
    missing = []
    for top in TOP:
        for f in sorted((ROOT / top).rglob("*.py")):
            rel = f.relative_to(ROOT)
            if f.name == "__init__.py" or "shipped" in rel.parts:
                continue
            folders = [p for p in rel.parts[1:-1] if p not in HEADINGS]
            if f.name not in block and not any(f"{p}/" in block for p in folders):
                missing.append(rel.as_posix())
    return missing


def test_the_readme_layout_names_every_module() -> None:
    assert unlisted_modules(layout_block()) == []


def test_a_module_left_out_of_the_layout_is_found() -> None:
    block = layout_block()
    assert "retinagen/dr_scale.py" in unlisted_modules(block.replace("dr_scale.py", ""))
    assert "retinagen/data/fov.py" in unlisted_modules(block.replace("fov.py", ""))
