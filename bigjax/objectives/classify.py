"""Classification: one label per row, from a text (the class head over the pooled sequence)
or from an image (the ViT). Loss over rows; accuracy in training, the confusion matrix in
eval (accuracy, precision, recall, F1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bigjax.loss import cross_entropy_sums
from bigjax.models import Model, decoder
from bigjax.models.vit import ViT
from bigjax.objectives.base import PER_WEIGHT, Batch, Metrics, model_inputs


def _real_rows(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(labels [B] with -1 made 0, weights [B, 1]: 1 on a real row). A row past the end of
    the held-out split is blank, with class -1 (`pipeline`); training never has one."""
    labels_B = batch["labels"]
    return jnp.maximum(labels_B, 0), (labels_B >= 0)[:, None].astype(jnp.float32)


class Classify:
    def classify(
        self, model: Model, batch: Batch, rng: jax.Array | None, embed_delta: jax.Array | None
    ) -> tuple[jax.Array, Metrics]:
        """(class logits [B, C], auxiliary outputs) of the text classifier."""
        return decoder(model).classify(*model_inputs(batch, rng), embed_delta=embed_delta)

    def sums(
        self, model: Model, batch: Batch, rng: jax.Array | None, embed_delta: jax.Array | None
    ) -> tuple[Metrics, jax.Array]:
        logits_BC, aux = self.classify(model, batch, rng, embed_delta)
        labels_B, weights_B1 = _real_rows(batch)
        nll_sum, z_sq_sum = cross_entropy_sums(logits_BC[:, None], labels_B[:, None], weights_B1)
        correct = jnp.sum((jnp.argmax(logits_BC, -1) == labels_B) * weights_B1[:, 0])
        sums = {"nll_sum": nll_sum, "z_sq_sum": z_sq_sum, f"{PER_WEIGHT}accuracy": correct}
        return {**sums, **aux}, logits_BC

    def weight(self, batch: Batch) -> jax.Array:
        return jnp.asarray(batch["labels"].shape[0], jnp.float32)

    def tokens(self, batch: Batch, seq_len: int) -> jax.Array:
        return jnp.sum(batch["weights"])

    def eval_sums(self, model: Model, batch: Batch) -> Metrics:
        logits_BC, _ = self.classify(model, batch, None, None)
        classes = logits_BC.shape[-1]
        labels_B, weights_B1 = _real_rows(batch)
        nll_sum, _ = cross_entropy_sums(logits_BC[:, None], labels_B[:, None], weights_B1)
        truth_BC = jax.nn.one_hot(labels_B, classes) * weights_B1
        predicted_BC = jax.nn.one_hot(jnp.argmax(logits_BC, -1), classes)
        # confusion [true class, predicted class]: accuracy, precision, recall and F1 from it
        return {"nll_sum": nll_sum, "weight_sum": jnp.sum(weights_B1),
                "confusion": truth_BC.T @ predicted_BC}  # fmt: skip


class Images(Classify):
    """The ViT: a batch of images and labels; every patch token counts for throughput."""

    def classify(
        self, model: Model, batch: Batch, rng: jax.Array | None, embed_delta: jax.Array | None
    ) -> tuple[jax.Array, Metrics]:
        if not isinstance(model, ViT):
            raise TypeError(f"image classification needs the ViT, not {type(model).__name__}")
        return model.classify(batch["images"], rng, embed_delta=embed_delta)

    def tokens(self, batch: Batch, seq_len: int) -> jax.Array:
        return jnp.asarray(batch["images"].shape[0] * seq_len, jnp.float32)
