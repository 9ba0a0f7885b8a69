"""`bigjax inspect`: what a trained decoder does with one prompt, as numbers and PNGs.

- attention maps: every layer's and head's attention probabilities over the prompt;
- logit lens: each layer's residual stream read out through the final norm and head, as the
  probability it already gives the true next token (nostalgebraist 2020);
- token attributions for the last position's prediction: gradient x input (summed over the
  embedding dim) and integrated gradients (Sundararajan et al. 2017) from a zero-embedding
  baseline, computed through the model's `embed_delta` hook;
- embedding projection: the token table by PCA, and by t-SNE when scikit-learn is present.

Everything runs on the run's parameters as `open_run` places them (FSDP over this
machine's devices), so it works on sharded models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax import progress
from bigjax.attention import attention_mask, attention_probs
from bigjax.models.llama import Llama

MAX_IG_STEPS = 4096


def attention_and_lens(model: Llama, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(attention probs [N, H, L, L], logit-lens p(next token) [N + 1, L - 1]) for one prompt
    (row 0 of the lens: the embeddings; row i: after layer i)."""
    t = jnp.asarray(tokens)[None]
    length = t.shape[1]
    seg, pos = jnp.ones_like(t), jnp.arange(length)[None]
    x = model.input_embeddings(t, pos)
    block_def, block_params = nnx.split(model.blocks)
    maps, lens = [], [_next_token_prob(model, x, t)]
    for i in range(model.num_layers):
        block = nnx.merge(block_def, jax.tree.map(lambda a, i=i: a[i], block_params))
        q_BLHK, k_BLGK, _ = block.attn.qkv(block.attn_norm(x), pos)
        mask_B1LL = attention_mask(seg, block.attn.causal)
        probs_BGRLL = attention_probs(q_BLHK, k_BLGK, mask_B1LL)
        maps.append(np.asarray(probs_BGRLL[0]).reshape(-1, length, length))
        x, _ = block(x, seg, pos, None)
        lens.append(_next_token_prob(model, x, t))
    return np.stack(maps), np.stack(lens)


def _next_token_prob(model: Llama, x_BLD: jax.Array, t_BL: jax.Array) -> np.ndarray:
    logp = jax.nn.log_softmax(model.logits(x_BLD).astype(jnp.float32), axis=-1)
    return np.exp(np.asarray(jnp.take_along_axis(logp[0, :-1], t_BL[0, 1:, None], -1)[:, 0]))


def attributions(model: Llama, tokens: np.ndarray, steps: int = 32) -> dict[str, Any]:
    """Gradient x input and integrated gradients of log p(the model's top next token at the
    last position) with respect to each input token's embedding, summed over the dims."""
    t = jnp.asarray(tokens)[None]
    seg, pos = jnp.ones_like(t), jnp.arange(t.shape[1])[None]
    emb = model.input_embeddings(t, pos)
    target = int(jnp.argmax(model(t, seg, pos)[0, -1]))
    graphdef, params = nnx.split(model)

    def logp_at(params, delta: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params)(t, seg, pos, embed_delta=delta)
        return jax.nn.log_softmax(logits.astype(jnp.float32)[0, -1])[target]

    # One compiled program for the whole path: op-by-op gradients cost seconds per point.
    # d logp / d x at x = alpha * emb is d logp / d delta at delta = (alpha - 1) * emb;
    # lax.map keeps one point's activations in memory at a time (a vmap would hold all).
    @jax.jit
    def path_grads(params, emb, alphas):
        return jax.lax.map(lambda a: jax.grad(logp_at, 1)(params, (a - 1.0) * emb), alphas)

    alphas = jnp.asarray(np.r_[1.0, (np.arange(steps) + 0.5) / steps], jnp.float32)
    grads = path_grads(params, emb, alphas)  # row 0 at the input, then the midpoint rule
    gxi = np.asarray(jnp.sum(grads[0] * emb, -1)[0])
    ig = np.asarray(jnp.sum(grads[1:].mean(0) * emb, -1)[0])
    # IG's completeness: its sum equals logp(input) - logp(baseline), up to the quadrature
    completeness = float(logp_at(params, jnp.zeros_like(emb)) - logp_at(params, -emb))
    return {"target": target, "grad_x_input": gxi, "integrated_gradients": ig,
            "ig_completeness": completeness}  # fmt: skip


def projection(table_VD: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """2-D PCA of the chosen rows of the embedding table, and t-SNE when available."""
    x = np.asarray(table_VD, np.float64)[rows]
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = {"pca": x @ vt[:2].T}
    try:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max(2.0, (len(rows) - 1) / 3))
        out["tsne"] = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(x)
    except ImportError:
        pass
    return out


def write_pngs(out: Path, labels: list[str], maps, lens, attr, proj, proj_labels) -> list[Path]:
    """The figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    n_layers, heads = maps.shape[:2]
    fig, axes = plt.subplots(n_layers, heads, figsize=(2.6 * heads, 2.6 * n_layers), squeeze=False)
    images = []
    for i in range(n_layers):
        for h in range(heads):
            ax = axes[i][h]
            images.append(ax.imshow(maps[i, h], cmap="viridis", vmin=0, vmax=1))
            ax.set_title(f"layer {i} head {h}", fontsize=7)
            # Token labels (queries down, keys across) only where they stay legible.
            ticks = range(len(labels)) if len(labels) <= 24 else []
            ax.set_xticks(ticks, [labels[t] for t in ticks], fontsize=5, rotation=90)
            ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=5)
    fig.suptitle("attention weights (rows: query tokens, columns: the keys they attend to)")
    fig.tight_layout()
    fig.colorbar(images[-1], ax=axes, shrink=0.6, label="attention weight")  # all 0..1
    written.append(_save(fig, out / "attention.png"))

    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels)), 1 + 0.4 * len(lens)))
    image = ax.imshow(lens, aspect="auto", cmap="magma", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="p(true next token)")
    ax.set_yticks(range(len(lens)), ["embed"] + [f"layer {i}" for i in range(len(lens) - 1)])
    ax.set_xticks(range(len(labels) - 1), labels[1:], fontsize=7)
    ax.set_title("logit lens: p(true next token) read out after each layer")
    written.append(_save(fig, out / "logit_lens.png"))

    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(labels)), 4), sharex=True)
    for ax, key in zip(axes, ("grad_x_input", "integrated_gradients"), strict=True):
        ax.bar(range(len(labels)), attr[key], color="tab:blue")
        ax.set_title(key.replace("_", " "), fontsize=9)
    axes[-1].set_xticks(range(len(labels)), labels, fontsize=7)
    fig.suptitle(f"attribution of the prediction of token {attr['target']} to each input token")
    fig.tight_layout()
    written.append(_save(fig, out / "attributions.png"))

    for name, xy in proj.items():
        fig, ax = plt.subplots(figsize=(7, 7))
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5)
        for (x, y), label in zip(xy, proj_labels, strict=True):
            ax.annotate(label, (x, y), fontsize=6)
        ax.set_title(f"token embeddings, {name.upper()} ({len(proj_labels)} rows of the table)")
        written.append(_save(fig, out / f"embeddings_{name}.png"))
    return written


def token_label(tok: Any, token_id: int) -> str:
    """How one token reads on a plot: specials by name (<bos>), text with whitespace and
    control characters escaped (\\n, and a visible ␣ for a space), a byte that is not a
    whole UTF-8 character as \\xNN, and ids the tokenizer has no text for as #id."""
    specials = {tok.bos_id: "<bos>", tok.eos_id: "<eos>", tok.pad_id: "<pad>"}
    if token_id in specials:
        return specials[token_id]
    if token_id >= tok.vocab_size:
        return f"#{token_id}"  # a row of the table past the vocabulary (padding)
    if tok.kind == "byte":
        try:
            text = bytes([token_id]).decode("utf-8")
        except UnicodeDecodeError:  # one byte of a multi-byte character
            return f"\\x{token_id:02x}"
    else:
        text = tok.decode([token_id])
        if not text or "\ufffd" in text:
            return f"#{token_id}"
    return "␣" if text == " " else repr(text)[1:-1].replace(" ", "␣")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def inspect_run(
    workdir: str,
    overrides: Sequence[str],
    prompt: str,
    out: str,
    ig_steps: int,
    embed_tokens: int,
) -> tuple[dict[str, Any], list[Path]]:
    """Attention maps, logit lens, attributions and embedding projections of a trained run on
    `prompt`, as PNGs in `out`; returns a summary and the files written."""
    from bigjax.config import ConfigError
    from bigjax.trained import open_run

    # t-SNE needs more rows than its perplexity (2); integrated gradients keep every step's
    # gradient (steps x tokens x d_model floats: 10**20 steps was numpy's "maximum allowed
    # size" traceback; tens to hundreds of steps converge)
    if not 1 <= ig_steps <= MAX_IG_STEPS or embed_tokens < 3:
        raise ConfigError(f"inspect: --ig-steps {ig_steps} --embed-tokens {embed_tokens}: use "
                          f"1 to {MAX_IG_STEPS} steps and 3 or more rows.")  # fmt: skip
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"inspect: --out {out} is a file; pass a directory for the PNGs.")
    with open_run(workdir, overrides, "inspect") as (prog, params, step):
        if prog.cfg.model.family == "vit":
            raise ConfigError("inspect: text models only (attention over a prompt's tokens).")
        tok = prog.resources.tokenizer
        tokens = np.asarray([tok.bos_id, *tok.encode(prompt).tolist()], np.int32)
        # the lens scores each next token of the prompt: it needs one; past the positions the
        # run trained on the maps show extrapolation (and an L x L figure nobody can read)
        most = prog.cfg.data.seq_len - 1  # data.seq_len, with BOS
        if not 1 <= len(tokens) - 1 <= most:
            raise ConfigError(f"inspect: the prompt is {len(tokens) - 1} tokens; give 1 to "
                              f"{most} (the run's data.seq_len, with BOS).")  # fmt: skip
        labels = [token_label(tok, int(t)) for t in tokens]
        model = nnx.merge(prog.graphdef, params)
        bar = progress.Bar("inspect", 5, "stages")
        maps, lens = attention_and_lens(model, tokens)
        bar.advance(note="attention maps and logit lens")
        attr = attributions(model, tokens, steps=ig_steps)
        bar.advance(note=f"integrated gradients ({ig_steps} steps)")
        table = np.asarray(params["embed"]["table_VD"])
        rows = np.arange(min(embed_tokens, table.shape[0]))
        proj = projection(table, rows)
        bar.advance(note="embedding projections")
        names = [token_label(tok, int(r)) for r in rows]
        written = write_pngs(Path(out), labels, maps, lens, attr, proj, names)
        bar.advance(2, note="figures written")
        bar.close()
    summary = {
        "step": step,
        "tokens": len(tokens),
        "next_token": tok.decode([attr["target"]]),
        "lens_last": float(lens[-1].mean()),
        "lens_first": float(lens[0].mean()),
    }
    return summary, written
