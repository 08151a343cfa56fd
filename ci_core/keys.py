"""Content keys: the one hash of a spec that the reference cache and the benchmark store both file results under.

A key must change whenever the result could: ``backbone_key`` therefore holds every property of a backbone
that changes what it computes (architecture, activation, weights, image size and normalisation), not only
where its weights came from.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # the store's records hash specs without loading a model library
    from ci_core.models.backbone import Backbone


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON: sorted keys, no whitespace, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def spec_hash(spec: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``spec``."""
    return hashlib.sha256(canonical_json(spec)).hexdigest()


def backbone_key(backbone: "Backbone") -> dict:
    """Everything about ``backbone`` that changes its outputs.

    ``quick_gelu`` is here because random or file weights take the activation a bundle asks for: the same
    weights under GELU and QuickGELU are two backbones, which would otherwise share one key.
    """
    return {"name": backbone.name, "quick_gelu": bool(backbone.quick_gelu), "weights_sha256": backbone.weights_sha256,
            "image_size": int(backbone.image_size), "mean": [float(v) for v in backbone.mean],
            "std": [float(v) for v in backbone.std]}
