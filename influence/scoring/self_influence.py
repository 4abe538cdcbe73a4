"""Self-influence: each training example's gradient against its own preconditioned gradient.

``⟨DW_n, (G + λI)⁻¹ DW_n⟩`` summed over tracked layers, computed in the eigenbasis
(``Σ_ij (Q_Aᵀ DW_n Q_S)²_ij / (Λ_ij + λ)``), so no query side is needed: one pass over
the training set.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from influence.capture.objectives import layer_gradients
from influence.capture.per_example import example_chunk
from influence.curvature import LayerCurvature
from influence.curvature.blocks import matmul_last
from influence.factors import Factors
from influence.runtime.data import as_source
from influence.runtime.driver import concatenate, run_pass
from influence.runtime.execution import Execution
from influence.runtime.mesh import DATA, describe_mesh, local, spec
from influence.scoring.contractions import stack_layers
from influence.scoring.finite import RowCheck
from influence.scoring.preconditioned import (
    GRADIENT_STATICS,
    prepare,
    score_checkpoint,
    scoring_batch,
    scoring_mesh,
)
from influence.scoring.results import SelfScores


def _self_layer_scores(a, g, curvature: LayerCurvature, damping) -> jax.Array:
    """⟨DW_b, P(DW_b)⟩ per example ``[B]``, in the eigenbasis when there is one."""
    if curvature.q_a is not None:
        a, g = matmul_last(a, curvature.q_a), matmul_last(g, curvature.q_s)
    weights = 1.0 if curvature.eigenvalues is None else 1.0 / (curvature.eigenvalues.astype(a.dtype) + damping)
    if a.shape[1] == 1:  # DW_b = ā_b g_bᵀ: Σ_ij ā_i² g_j² W_ij without forming DW_b
        a2, g2 = a[:, 0] ** 2, g[:, 0] ** 2
        return jnp.sum((a2 @ weights) * g2, axis=-1) if curvature.eigenvalues is not None else a2.sum(-1) * g2.sum(-1)
    chunk = example_chunk(a.shape[0], a.shape[-1] * g.shape[-1])

    def one_example(xs):
        dw = xs[0].T @ xs[1]
        return jnp.sum(dw * dw * weights)

    return jax.lax.map(one_example, (a, g), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=GRADIENT_STATICS + ("mesh", "keep_layers"))
def _self_step(curvature, damping, state, batch, example_mask, *, graphdef, layers, task, kind, mesh, keep_layers):
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)

    def per_device(a, g, curvature, damping):
        return stack_layers([_self_layer_scores(a[i.name], g[i.name], curvature[i.name], damping[i.name])
                              for i in layers], keep_layers)

    return local(per_device, mesh, (spec(DATA), spec(DATA), spec(), spec()), spec(None, DATA))(a, g, curvature, damping)



def self_scores(model: nnx.Module, task: Any, factors: Factors, train: Any, *, damping: float | None = None,
                per_layer: bool = False, execution: Execution | None = None, **options: Any) -> SelfScores:
    """Self-influence ∇L_nᵀ (G + λI)⁻¹ ∇L_n of every training example.

    Args:
      damping, per_layer: as for :func:`influence.pairwise_scores`.
      execution, **options: run settings (:class:`influence.Execution`).

    Returns:
      :class:`~influence.SelfScores` with ``values [n_train]`` (and ``per_layer``).
    """
    run = Execution.of(execution, options)
    mesh = scoring_mesh(run.mesh, run.batch_size)
    tracked, curvature, dampings = prepare(model, factors, damping, mesh)
    run = scoring_batch(run, tracked, task, train, mesh)
    source = as_source(train, run.batch_size, task, model)
    checkpoint = score_checkpoint("self-scores", run, tracked, factors, dampings, lambda: {"per_layer": per_layer})

    finite = RowCheck(source.batch_size, what="self-influence")

    def score(step):
        out = _self_step(curvature, dampings, tracked.state, step.arrays, step.example_mask, graphdef=tracked.graphdef,
                         layers=tracked.layers, task=task, kind="empirical", mesh=mesh, keep_layers=per_layer)
        finite.update(out, step.batch)
        return out

    resumed = checkpoint.load() if checkpoint is not None else None
    accumulator = finite.guard(concatenate(score), checkpointed=checkpoint is not None)
    collected = run_pass(accumulator, source, mesh, checkpoint=checkpoint, resumed=resumed,
                         desc="self scores", progress=run.progress).value
    values = collected.sum(axis=0)
    metadata = {"strategy": factors.strategy, "damping": dampings, "layers": list(tracked.layer_names),
                "n_train": int(values.shape[0]), "fingerprint": tracked.fingerprint, "mesh": describe_mesh(mesh),
                "batch_size": run.batch_size}
    per = {name: collected[i] for i, name in enumerate(tracked.layer_names)} if per_layer else None
    return SelfScores(values, per, metadata)
