"""The factor map: which latent code controls which attribute (``factors.json``), its format and its lookups.

`retinagen discover` (`retinagen.metrics.discovery`) writes it; generation, the CLI and the dashboard read it
to resolve ``--set pigmentation=0.8``. It lives apart from discovery so that sampling code can read a map
without importing the discovery that samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retinagen.checks import check, number_in
from retinagen.errors import BadInputError
from retinagen.fileio import atomic_write_json, read_json
from retinagen.metrics.attributes import SYNONYMS

__all__ = ["FACTOR_MAP_SCHEMA", "attribute_codes", "factor_aliases", "load_factor_map", "save_factor_map"]

FACTOR_MAP_SCHEMA = "retinagen.factor_map/1"
_KINDS = ("categorical", "bernoulli", "uniform")

# A factor map as a mapping, or a `DiscoveryResult` (anything with ``to_json()`` giving one).
MapLike = Any


def save_factor_map(result: MapLike, path: str | Path) -> Path:
    """Write the factor map JSON atomically (validated first); returns the path."""
    data = dict(_as_map(result))
    _validate(data, None)
    path = Path(path)
    atomic_write_json(path, data)
    return path


def load_factor_map(path: str | Path) -> dict[str, Any]:
    """Read and validate a factor map written by `save_factor_map`; `BadInputError` naming the problem."""
    path = Path(path)
    data = read_json(path, "factor map")
    _validate(data, path)
    return data


def _validate(data: Any, path: Path | None) -> None:
    def bad(reason: str) -> BadInputError:
        return BadInputError(path, f"invalid factor map: {reason}")

    if not isinstance(data, dict):
        raise bad("the top level must be an object")
    if data.get("schema") != FACTOR_MAP_SCHEMA:
        raise bad(f"schema must be {FACTOR_MAP_SCHEMA!r}, got {data.get('schema')!r}")
    codes, attrs = data.get("codes"), data.get("attributes")
    if not isinstance(codes, dict) or not isinstance(attrs, dict):
        raise bad("'codes' and 'attributes' must be objects")
    for code, entry in codes.items():
        if not isinstance(code, str) or not isinstance(entry, dict):
            raise bad(f"code {code!r}: each code must map to an object")
        attr = entry.get("attribute")
        if attr is not None and not isinstance(attr, str):
            raise bad(f"code {code}: 'attribute' must be a name or null")
        if entry.get("kind") not in _KINDS:
            raise bad(f"code {code}: 'kind' must be one of {', '.join(_KINDS)}")
        for key in ("effect", "consistency", "score"):
            check(number_in(), entry.get(key, 0.0), f"code {code}: {key!r}", bad)
        if not 0.0 <= entry.get("consistency", 0.0) <= 1.0:
            raise bad(f"code {code}: 'consistency' must lie in [0, 1]")
        if entry.get("direction", 1) not in (-1, 0, 1):
            raise bad(f"code {code}: 'direction' must be -1, 0 or +1")
        if attr is not None and attrs.get(attr) != code:
            raise bad(
                f"code {code} is assigned {attr!r} but 'attributes' maps {attr!r} to {attrs.get(attr)!r}"
            )
    for attr, code in attrs.items():
        if not isinstance(code, str) or code not in codes:
            raise bad(f"attribute {attr!r} maps to unknown code {code!r}")
        if codes[code].get("attribute") != attr:
            raise bad(
                f"attribute {attr!r} maps to {code}, whose attribute is {codes[code].get('attribute')!r}"
            )


def _as_map(factor_map: MapLike) -> Mapping[str, Any]:
    return factor_map.to_json() if hasattr(factor_map, "to_json") else factor_map


def factor_aliases(factor_map: MapLike) -> dict[str, str]:
    """Code name -> assigned attribute name (e.g. ``{"c4": "pigmentation"}``); unassigned codes left out.

    This is the ``aliases`` argument of `retinagen.generation.parse_code_settings`.
    """
    codes = _as_map(factor_map).get("codes", {})
    return {code: e["attribute"] for code, e in codes.items() if isinstance(e, dict) and e.get("attribute")}


def attribute_codes(factor_map: MapLike) -> dict[str, str]:
    """Every name a user may type for a discovered attribute -> its code, synonyms included.

    ``{"pigmentation": "c4", "melanin": "c4", ...}``: what ``generate --set melanin=0.8`` resolves.
    """
    out: dict[str, str] = {}
    aliases = factor_aliases(factor_map)
    for code, attr in aliases.items():
        out[attr] = code
    for syn, attr in SYNONYMS.items():
        if attr in out and syn not in out:
            out[syn] = out[attr]
    return out
