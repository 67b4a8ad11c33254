"""A small top-k sparse autoencoder in JAX, trained on a beam-extract output directory; or, with
--target, a transcoder: latents of one hook's activations decoded into another's at the same tokens.

    python examples/train_sae.py activations blocks.2.hook_resid_post --steps 1000
    python examples/train_sae.py activations blocks.2.ln2.hook_normalized --target blocks.2.hook_mlp_out

(the transcoder reads a job's output of `--sites mlp_in,mlp_out`: the MLP's normalised input and
what it adds to the residual, read paired by `token_batches(hooks=...)`). Each hook is scaled by its
manifest mean squared norm so that E|x|^2 = its width (the usual SAE normalisation); the loss is the
MSE of the scaled target (the input itself for an SAE).
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from beam_extract.format.layout import read_manifest
from beam_extract.readers.reader import token_batches


def init_params(key: jax.Array, d_in: int, n_latents: int, d_out: int | None = None) -> dict:
    """An SAE's parameters (d_out None: decoding back into the input, the decoder tied at the start),
    or a transcoder's (decoding into a target d_out wide, centring its input by a bias of its own)."""
    encoder = jax.random.normal(key, (d_in, n_latents)) / jnp.sqrt(d_in)
    if d_out is None:
        return {"W_enc": encoder, "b_enc": jnp.zeros(n_latents), "W_dec": encoder.T, "b_dec": jnp.zeros(d_in)}
    decoder = jax.random.normal(jax.random.fold_in(key, 1), (n_latents, d_out)) / jnp.sqrt(n_latents)
    return {"W_enc": encoder, "b_enc": jnp.zeros(n_latents), "W_dec": decoder, "b_dec": jnp.zeros(d_out),
            "b_in": jnp.zeros(d_in)}


def reconstruct(params: dict, x: jax.Array, k: int) -> jax.Array:
    pre = (x - params.get("b_in", params["b_dec"])) @ params["W_enc"] + params["b_enc"]
    values, indices = jax.lax.top_k(pre, k)
    latents = jnp.zeros_like(pre).at[jnp.arange(len(x))[:, None], indices].set(jax.nn.relu(values))
    return latents @ params["W_dec"] + params["b_dec"]


def loss(params: dict, x: jax.Array, y: jax.Array, k: int) -> jax.Array:
    return jnp.mean((reconstruct(params, x, k) - y) ** 2)


def train(output: str, hook: str, steps: int = 500, batch_tokens: int = 256, n_latents: int = 512, k: int = 16,
          learning_rate: float = 1e-3, seed: int = 0, target: str | None = None) -> list[float]:
    """Trains for `steps` batches (cycling over the data as needed); returns the loss of each step.
    With `target`, a transcoder from `hook` to `target`, their tokens read paired."""
    hooks = read_manifest(output)["hooks"]
    scales = [np.sqrt(hooks[name]["width"] / hooks[name]["mean_squared_norm"]) for name in (hook, target or hook)]
    params = init_params(jax.random.PRNGKey(seed), hooks[hook]["width"], n_latents,
                         hooks[target]["width"] if target else None)
    optimizer = optax.adam(learning_rate)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y, k)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, value

    def epoch(number: int):
        options = dict(batch_tokens=batch_tokens, shuffle_buffer=8 * batch_tokens, seed=seed + number)
        if target is None:
            return ((x, x) for x in token_batches(output, hook, **options))
        return token_batches(output, hooks=[hook, target], **options)

    losses = []
    for x, y in itertools.islice(itertools.chain.from_iterable(map(epoch, itertools.count())), steps):
        params, state, value = step(params, state, jnp.asarray(x * scales[0]), jnp.asarray(y * scales[1]))
        losses.append(float(value))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("hook")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--target", help="A hook to decode into (a transcoder): e.g. blocks.2.hook_mlp_out")
    args = parser.parse_args()
    losses = train(args.output, args.hook, args.steps, n_latents=args.latents, k=args.k, target=args.target)
    for i in range(0, len(losses), max(1, len(losses) // 10)):
        print(f"step {i:5d}  mse {losses[i]:.4f}")
    print(f"step {len(losses) - 1:5d}  mse {losses[-1]:.4f}  ({losses[-1] / losses[0]:.2%} of the first step)")


if __name__ == "__main__":
    main()
