"""A small top-k sparse autoencoder in JAX, trained on a beam-extract output directory.

    python examples/train_sae.py activations blocks.2.hook_resid_post --steps 1000

Inputs are scaled by the manifest's mean squared norm so that E|x|^2 = d_model (the usual SAE
normalisation); the loss is the reconstruction MSE of the scaled inputs.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from beam_extract.output.layout import read_manifest
from beam_extract.output.reader import token_batches


def init_params(key: jax.Array, d_model: int, n_latents: int) -> dict:
    encoder = jax.random.normal(key, (d_model, n_latents)) / jnp.sqrt(d_model)
    return {"W_enc": encoder, "b_enc": jnp.zeros(n_latents), "W_dec": encoder.T, "b_dec": jnp.zeros(d_model)}


def reconstruct(params: dict, x: jax.Array, k: int) -> jax.Array:
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    values, indices = jax.lax.top_k(pre, k)
    latents = jnp.zeros_like(pre).at[jnp.arange(len(x))[:, None], indices].set(jax.nn.relu(values))
    return latents @ params["W_dec"] + params["b_dec"]


def loss(params: dict, x: jax.Array, k: int) -> jax.Array:
    return jnp.mean((reconstruct(params, x, k) - x) ** 2)


def train(output: str, hook: str, steps: int = 500, batch_tokens: int = 256, n_latents: int = 512, k: int = 16,
          learning_rate: float = 1e-3, seed: int = 0) -> list[float]:
    """Trains for `steps` batches (cycling over the data as needed); returns the loss of each step."""
    stats = read_manifest(output)["hooks"][hook]
    d_model = read_manifest(output)["d_model"]
    scale = np.sqrt(d_model / stats["mean_squared_norm"])
    params = init_params(jax.random.PRNGKey(seed), d_model, n_latents)
    optimizer = optax.adam(learning_rate)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, x):
        value, grads = jax.value_and_grad(loss)(params, x, k)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, value

    batches = itertools.chain.from_iterable(
        token_batches(output, hook, batch_tokens, shuffle_buffer=8 * batch_tokens, seed=seed + epoch)
        for epoch in itertools.count())
    losses = []
    for x in itertools.islice(batches, steps):
        params, state, value = step(params, state, jnp.asarray(x * scale))
        losses.append(float(value))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("hook")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    losses = train(args.output, args.hook, args.steps, n_latents=args.latents, k=args.k)
    for i in range(0, len(losses), max(1, len(losses) // 10)):
        print(f"step {i:5d}  mse {losses[i]:.4f}")
    print(f"step {len(losses) - 1:5d}  mse {losses[-1]:.4f}  ({losses[-1] / losses[0]:.2%} of the first step)")


if __name__ == "__main__":
    main()
