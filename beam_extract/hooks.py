"""TransformerLens-style hook names and the sites a hook may name.

Residual and sublayer-output sites are `blocks.{layer}.hook_{site}`; the sites inside a sublayer
carry TransformerLens's module path (`blocks.{layer}.ln2.hook_normalized`, `.attn.hook_z`,
`.mlp.hook_post`). `z` and `mlp_post` are TransformerLens's values; `mlp_in` is what the MLP reads,
the norm's output with its weight (and bias) applied, where TransformerLens's hook_normalized is
before them (README, hook table).

Light on purpose: readers and consumers import it without JAX, transformers or Beam."""

from __future__ import annotations

import re

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "mlp_in", "z", "mlp_post")
# The sites inside a sublayer, by their TransformerLens name after `blocks.{layer}.`.
INNER_NAMES = {"mlp_in": "ln2.hook_normalized", "z": "attn.hook_z", "mlp_post": "mlp.hook_post"}

Hook = tuple[int, str]  # (layer, site)

_HOOK = re.compile(r"blocks\.(\d+)\.([a-z0-9_.]+)")
_SITE_OF = {**{f"hook_{site}": site for site in SITES if site not in INNER_NAMES},
            **{name: site for site, name in INNER_NAMES.items()}}


def hook_name(layer: int, site: str) -> str:
    return f"blocks.{layer}.{INNER_NAMES.get(site, f'hook_{site}')}"


def parse_hook_name(name: str, num_layers: int) -> Hook:
    """(layer, site) for a hook name; a clear error for unknown sites or layers out of range."""
    match = _HOOK.fullmatch(name)
    if not match:
        raise ValueError(f"hook name {name!r} is not of the form blocks.<layer>.hook_<site>")
    layer, site = int(match.group(1)), _SITE_OF.get(match.group(2))
    if site is None:
        raise ValueError(f"hook {name!r}: unknown site {match.group(2)!r}; a layer's hooks are {', '.join(_SITE_OF)}")
    if layer >= num_layers:
        raise ValueError(f"hook {name!r}: layer {layer} does not exist (the model has {num_layers} layers)")
    return layer, site
