"""The pure train and eval steps. `train.py` jits them with explicit shardings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bigjax import lora, mlm, privacy, robust
from bigjax.config import OptimConfig
from bigjax.loss import cross_entropy_sums
from bigjax.sharding import Rules, constrain
from bigjax.state import Params, TrainState
from bigjax.tree import path_name

# Key streams of their own for MLM masks and DP noise (dropout uses the step key's
# micro-batch folds 0, 1, ...).
MLM_STREAM = 0x4D4C4D
DP_STREAM = 0x4450
TEXT_STREAM = 0x545854

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions, weights: all [B, L]
Metrics = dict[str, jax.Array]


def _model(graphdef: nnx.GraphDef, params: Params, lora_scale: float) -> nnx.Module:
    return nnx.merge(graphdef, lora.merged(params, lora_scale))


def _inputs(batch: Batch, rng: jax.Array | None) -> tuple:
    if "images" in batch:  # the ViT
        return batch["images"], rng
    return batch["inputs"], batch["segment_ids"], batch["positions"], rng


@dataclasses.dataclass(frozen=True)
class Teacher:
    """Distillation: the teacher's program (its params are the step's third argument)."""

    graphdef: nnx.GraphDef
    temperature: float
    alpha: float


def _distill_kl_sum(student_BLV, teacher_BLV, weights_BL, temperature) -> jax.Array:
    """Sum over weighted tokens of T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
    t = jax.nn.log_softmax(teacher_BLV.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_BLV.astype(jnp.float32) / temperature, axis=-1)
    kl_BL = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return temperature**2 * jnp.sum(kl_BL * weights_BL)


def _loss_sums(
    model: nnx.Module,
    batch: Batch,
    rng: jax.Array | None,
    teacher: tuple[Teacher, Params] | None = None,
    embed_delta: jax.Array | None = None,
) -> Metrics:
    """Summed losses of one (micro-)batch and the model's auxiliary outputs: over weighted
    target tokens (language modelling, SFT), or over rows with a class label (classify).
    With a teacher, also the summed distillation term `distill_sum`."""
    if "labels" in batch:
        logits_BC, aux = model.classify(
            *_inputs(batch, rng), with_aux=True, embed_delta=embed_delta
        )
        labels_B = batch["labels"]
        ones_B1 = jnp.ones((labels_B.shape[0], 1), jnp.float32)
        nll_sum, z_sq_sum = cross_entropy_sums(logits_BC[:, None], labels_B[:, None], ones_B1)
        correct = jnp.sum(jnp.argmax(logits_BC, -1) == labels_B).astype(jnp.float32)
        return {"nll_sum": nll_sum, "z_sq_sum": z_sq_sum, "correct": correct, **aux}
    logits_BLV, aux = model(*_inputs(batch, rng), with_aux=True, embed_delta=embed_delta)
    nll_sum, z_sq_sum = cross_entropy_sums(logits_BLV, batch["targets"], batch["weights"])
    if teacher is None:
        return {"nll_sum": nll_sum, "z_sq_sum": z_sq_sum, **aux}
    spec, params = teacher
    teacher_BLV = jax.lax.stop_gradient(nnx.merge(spec.graphdef, params)(*_inputs(batch, None)))
    kl_sum = _distill_kl_sum(logits_BLV, teacher_BLV, batch["weights"], spec.temperature)
    return {"nll_sum": nll_sum, "z_sq_sum": z_sq_sum, "distill_sum": kl_sum, **aux}


def _tokens(batch: Batch, seq_len: int) -> jax.Array:
    """Tokens trained on: weighted targets, or every patch token of every image (ViT)."""
    if "images" in batch:
        return jnp.asarray(batch["images"].shape[0] * seq_len, jnp.float32)
    return jnp.sum(batch["weights"])


def _embed_shape(batch: Batch, seq_len: int, d_model: int) -> tuple[int, int, int]:
    """[B, L, D] of the input embeddings (a ViT's L is its patches plus the class token)."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    length = seq_len if "images" in batch else batch["inputs"].shape[1]
    return rows, length, d_model


def _adversarial_sums(
    model: nnx.Module, batch: Batch, rng, adversary: robust.Adversary, seq_len: int, d_model: int
) -> Metrics:
    """Loss sums at the attack's perturbation of the input embeddings."""

    def loss_of(delta: jax.Array) -> jax.Array:
        sums = _loss_sums(model, batch, rng, None, delta)
        return sums["nll_sum"] / _loss_weight(batch)

    delta = robust.perturbation(loss_of, _embed_shape(batch, seq_len, d_model), adversary)
    return _loss_sums(model, batch, rng, None, delta)


def _loss_weight(batch: Batch) -> jax.Array:
    """What the summed losses are divided by: target tokens, or rows when classifying."""
    if "labels" in batch:
        return jnp.asarray(batch["labels"].shape[0], jnp.float32)
    return jnp.maximum(jnp.sum(batch["weights"]), 1.0)


def _split_micro(batch: Batch, num_micro: int, rules: Rules) -> Batch:
    """[B, L] -> [A, B/A, L] taking rows A apart, so every device's shard of the batch feeds
    every micro-batch (a plain reshape would give micro-batch 0 to the first devices only)."""

    def split(x_BL: jax.Array) -> jax.Array:  # also [B] labels and [B, H, W, C] images
        b, *rest = x_BL.shape
        x_ABL = x_BL.reshape(b // num_micro, num_micro, *rest).swapaxes(0, 1)
        names = (None, "act_batch", "act_seq", *(None,) * (x_ABL.ndim - 3))  # images: whole
        return constrain(x_ABL, names[: x_ABL.ndim], rules)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: OptimConfig,
    rules: Rules,
    seed: int,
    dropout: bool,
    skip_nonfinite: bool = False,
    trainable: Callable[[str], bool] = lambda path: True,
    lora_scale: float = 0.0,
    masking: mlm.Masking | None = None,
    seq_len: int = 0,
    dp: privacy.Noise | None = None,
    teacher: Teacher | None = None,
    adversary: robust.Adversary | None = None,
    text_noise: robust.TextNoise | None = None,
    d_model: int = 0,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Builds `train_step(state, batch) -> (state, metrics)`, a pure function of its inputs.
    With `dp`, DP-SGD: per-row gradients clipped, summed, noised (bigjax/privacy.py)."""
    base_key = jax.random.key(seed)

    def train_step(
        state: TrainState, batch: Batch, teacher_params: Params | None = None
    ) -> tuple[TrainState, Metrics]:
        distill = None if teacher is None else (teacher, teacher_params)
        step_key = jax.random.fold_in(base_key, state.step)
        if masking is not None:  # masked LM: a fresh mask every step
            batch = mlm.corrupt(batch, jax.random.fold_in(step_key, MLM_STREAM), masking)
        if text_noise is not None:  # token dropout / span masking of the inputs
            batch = robust.corrupt_text(
                batch, jax.random.fold_in(step_key, TEXT_STREAM), text_noise
            )
        total_weight = _loss_weight(batch)
        num_micro = cfg.grad_accum_steps

        def loss_fn(params: Params, micro: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
            model = _model(graphdef, params, lora_scale)
            sums = _loss_sums(model, micro, rng if dropout else None, distill)
            hard = (sums["nll_sum"] + cfg.z_loss * sums["z_sq_sum"]) / total_weight
            if distill is None:
                objective = hard
            else:  # the hard loss and the teacher's soft targets, mixed
                soft = sums["distill_sum"] / total_weight
                objective = (1 - teacher.alpha) * hard + teacher.alpha * soft
            if adversary is not None:  # and the loss at the attack's perturbation
                adv = _adversarial_sums(model, micro, rng if dropout else None, adversary,
                                        seq_len, d_model)  # fmt: skip
                objective = (1 - adversary.weight) * objective + adversary.weight * (
                    adv["nll_sum"] / total_weight
                )
                sums = {**sums, "adv_nll_sum": adv["nll_sum"]}
            # auxiliary losses (MoE load balancing) are means per micro-batch: average them
            objective += sums.get("aux_loss", 0.0) / num_micro
            return objective, sums

        def only_trainable(grads: Params) -> Params:
            return jax.tree_util.tree_map_with_path(
                lambda p, g: g if trainable(path_name(p)) else jnp.zeros_like(g), grads
            )

        def row_grad(row: Batch, rng: jax.Array) -> tuple[Params, Metrics]:
            """One row's gradient of its own mean loss, clipped (DP-SGD)."""
            one = jax.tree.map(lambda x: x[None], row)

            def objective(params: Params) -> tuple[jax.Array, Metrics]:
                sums = _loss_sums(_model(graphdef, params, lora_scale), one, rng)
                value = (sums["nll_sum"] + cfg.z_loss * sums["z_sq_sum"]) / _loss_weight(one)
                return value + sums.get("aux_loss", 0.0), sums

            (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
            clipped, norm = privacy.clip(only_trainable(grads), dp.clip_norm)
            return clipped, {**sums, "dp_clipped": (norm > dp.clip_norm).astype(jnp.float32)}

        def micro_grads(micro: Batch, rng: jax.Array) -> tuple[Params, Metrics]:
            if dp is None:
                (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                    state.params, micro, rng
                )
                return grads, sums
            rows = jax.tree.leaves(micro)[0].shape[0]
            keys = jax.random.split(rng, rows) if dropout else jnp.zeros((rows,))
            grads, sums = jax.vmap(lambda row, key: row_grad(row, key if dropout else None))(
                micro, keys
            )
            # per-row sums add up to the micro-batch's (aux means: averaged over rows)
            sums = {k: jnp.mean(v) if k.startswith(("moe_", "aux")) else jnp.sum(v)
                    for k, v in sums.items()}  # fmt: skip
            return jax.tree.map(lambda g: jnp.sum(g, axis=0), grads), sums

        def accumulate(carry: tuple, micro_and_index: tuple) -> tuple[tuple, None]:
            grads, sums = carry
            micro, index = micro_and_index
            m_grads, m_sums = micro_grads(micro, jax.random.fold_in(step_key, index))
            return (
                jax.tree.map(jnp.add, grads, m_grads),
                jax.tree.map(jnp.add, sums, m_sums),
            ), None

        micros = (_split_micro(batch, num_micro, rules), jnp.arange(num_micro))
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first_micro = jax.tree.map(lambda x: x[0], micros[0])
        sums_shape = jax.eval_shape(lambda: micro_grads(first_micro, step_key)[1])
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), micros)
        if dp is not None:  # Gaussian noise on the sum of clipped gradients, then the mean
            rows = jax.tree.leaves(batch)[0].shape[0]
            key = jax.random.fold_in(step_key, DP_STREAM)
            noise = privacy.noise_like(grads, key, dp.noise_multiplier * dp.clip_norm)
            grads = jax.tree.map(lambda g, n: (g + n) / rows, grads, only_trainable(noise))
            clipped = sums.pop("dp_clipped") / rows  # the share of rows whose norm was cut
        nll_sum, z_sq_sum = sums.pop("nll_sum"), sums.pop("z_sq_sum")
        correct = sums.pop("correct", None)  # classification: rows predicted right
        distill_sum = sums.pop("distill_sum", None)
        adv_nll_sum = sums.pop("adv_nll_sum", None)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # of the trainable gradients only: a frozen one is never computed (XLA drops it)
        grad_norm = optax.tree.norm(
            jax.tree_util.tree_map_with_path(
                lambda p, g: g if trainable(path_name(p)) else jnp.zeros(()), grads
            )
        )
        # Checked on device and reported with the metrics (read a step later): no host sync.
        # The updated parameters too: finite gradients can still overflow them (a huge lr).
        param_norm = optax.tree.norm(params)
        finite = jnp.isfinite(nll_sum) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        if skip_nonfinite:  # drop the update, keep the old parameters and moments
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {
            "loss": nll_sum / total_weight,
            "z_loss": z_sq_sum / total_weight,
            "grad_norm": grad_norm,
            "finite": finite,
            "param_norm": param_norm,  # of the update's result, also when it was skipped
            "lr": schedule(state.step),
            "tokens": _tokens(batch, seq_len),
            **{k: v / num_micro for k, v in sums.items()},  # per-micro-batch means (MoE)
        }
        if correct is not None:
            metrics["accuracy"] = correct / total_weight
        if dp is not None:
            metrics["dp_clipped"] = clipped
        if distill_sum is not None:  # T^2 * KL(teacher || student) per target token
            metrics["distill_kl"] = distill_sum / total_weight
        if adv_nll_sum is not None:  # the loss at the adversarial perturbation
            metrics["adv_loss"] = adv_nll_sum / total_weight
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
    lora_scale: float = 0.0,
    masking: mlm.Masking | None = None,
    attack: robust.Adversary | None = None,
    seq_len: int = 0,
    d_model: int = 0,
) -> Callable[[Params, Batch], Metrics]:
    """Builds `eval_step(params, batch) -> {'nll_sum', 'weight_sum'}` (no dropout), plus
    'adv_nll_sum' under `attack`."""

    def eval_step(params: Params, batch: Batch) -> Metrics:
        if masking is not None:  # the same mask at every eval: comparable losses
            batch = mlm.corrupt(batch, jax.random.key(MLM_STREAM), masking)
        model = _model(graphdef, params, lora_scale)
        out = _eval_sums(model, batch)
        if attack is not None:
            adv = _adversarial_sums(model, batch, None, attack, seq_len, d_model)
            out["adv_nll_sum"] = adv["nll_sum"]
        return out

    return eval_step


def _eval_sums(model: nnx.Module, batch: Batch) -> Metrics:
    """Held-out sums: loss and weight, and the confusion matrix when classifying."""
    if "labels" not in batch:
        logits_BLV = model(*_inputs(batch, None))
        nll_sum, _ = cross_entropy_sums(logits_BLV, batch["targets"], batch["weights"])
        return {"nll_sum": nll_sum, "weight_sum": jnp.sum(batch["weights"])}
    logits_BC = model.classify(*_inputs(batch, None))
    classes = logits_BC.shape[-1]
    ones_B1 = jnp.ones((logits_BC.shape[0], 1), jnp.float32)
    nll_sum, _ = cross_entropy_sums(logits_BC[:, None], batch["labels"][:, None], ones_B1)
    truth_BC = jax.nn.one_hot(batch["labels"], classes)
    predicted_BC = jax.nn.one_hot(jnp.argmax(logits_BC, -1), classes)
    # confusion [true class, predicted class]: accuracy, precision, recall and F1 from it
    return {"nll_sum": nll_sum, "weight_sum": _loss_weight(batch),
            "confusion": truth_BC.T @ predicted_BC}  # fmt: skip
