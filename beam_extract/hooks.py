"""TransformerLens-style hook names, `blocks.{layer}.hook_{site}`, and the sites a hook may name.

Light on purpose: readers and consumers import it without JAX, transformers or Beam."""

from __future__ import annotations

import re

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")

Hook = tuple[int, str]  # (layer, site)

_HOOK = re.compile(r"blocks\.(\d+)\.hook_([a-z_]+)")


def hook_name(layer: int, site: str) -> str:
    return f"blocks.{layer}.hook_{site}"


def parse_hook_name(name: str, num_layers: int) -> Hook:
    """(layer, site) for a hook name; a clear error for unknown sites or layers out of range."""
    match = _HOOK.fullmatch(name)
    if not match:
        raise ValueError(f"hook name {name!r} is not of the form blocks.<layer>.hook_<site>")
    layer, site = int(match.group(1)), match.group(2)
    if site not in SITES:
        raise ValueError(f"hook {name!r}: unknown site {site!r}; sites are {', '.join(SITES)}")
    if layer >= num_layers:
        raise ValueError(f"hook {name!r}: layer {layer} does not exist (the model has {num_layers} layers)")
    return layer, site
