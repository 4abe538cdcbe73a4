"""Training: the loss falls, checkpoints resume exactly, runs load back and generate."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from influence.lm import TrainConfig, Trainer, load_run
from influence.lm import checkpoint as ckpt
from tests.lm.helpers import docs, tiny_config

STOP_AT = 20  # where the interrupted run stops (between checkpoints 16 and 24)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run, stepped by hand: (trainer, loss of every step, held-out
    loss before training)."""
    trainer = Trainer(tiny_config(), tmp_path_factory.mktemp("reference"), docs())
    before = trainer.evaluate()
    losses = [trainer.step() for _ in range(trainer.cfg.total_steps)]
    return trainer, losses, before


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The same run interrupted after STOP_AT steps and resumed in a new Trainer."""
    out = tmp_path_factory.mktemp("resumed")
    first = Trainer(tiny_config(), out, docs())
    first.run(max_steps=STOP_AT, progress=False)
    params_at_stop = first.params
    second = Trainer(tiny_config(), out, docs())
    return out, params_at_stop, second


def test_tiny_model_loss_decreases(reference):
    trainer, losses, before = reference
    assert trainer.cfg.total_steps == 48 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < losses[0] - 0.7
    assert trainer.evaluate() < before - 0.7


def test_resume_reproduces_next_step_loss_and_final_weights(reference, resumed):
    ref, ref_losses, _ = reference
    out, params_at_stop, trainer = resumed
    assert trainer.step_count == STOP_AT
    jax.tree.map(np.testing.assert_array_equal, trainer.params, params_at_stop)
    assert trainer.next_loss() == pytest.approx(ref_losses[STOP_AT], rel=1e-6)
    summary = trainer.run(progress=False)
    assert summary["steps"] == 48 and summary["final_checkpoint"] == "checkpoints/step_0000048"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), trainer.params, ref.params)
    # Kept: the evenly spaced checkpoints, the last one final; rolling ones are gone.
    assert sorted(ckpt.list_checkpoints(out / "checkpoints")) == [12, 24, 36, 48]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [16, 32, 48]
    saved = ckpt.latest_checkpoint(out / "checkpoints")
    assert {p.name for p in saved.iterdir()} == {"params.npz", "opt_state.npz", "state.json", "run.json",
                                                 "tokenizer.json"}


def test_load_run_gives_model_data_and_generation(resumed):
    out, _, trainer = resumed
    if not trainer.done:
        trainer.run(progress=False)
    run = load_run(out)
    assert run.step == 48 and run.checkpoints == [12, 24, 36, 48]
    jax.tree.map(np.testing.assert_array_equal, trainer.params, nnx.state(run.model, nnx.Param))
    assert run.config.context_length == 32 and run.tokenizer.vocab_size == 512
    assert len(run.train) == len(trainer.train_ids) and len(run.heldout) == len(trainer.held_ids)
    assert set(run.heldout["doc_id"]).isdisjoint(run.train["doc_id"])
    assert run.info["summary"]["heldout_bits"] < np.log2(run.tokenizer.vocab_size)  # beats uniform
    assert run.state["step"] == 48 and run.train_config["scale"] == "tiny"
    early = run.model_at(12)
    assert not np.allclose(early.lm_head.kernel.get_value(), run.model.lm_head.kernel.get_value())
    greedy = run.generate("MACBETH:\n", max_new_tokens=12)
    assert isinstance(greedy, str) and greedy and greedy == run.generate("MACBETH:\n", max_new_tokens=12)
    sampled = run.generate("MACBETH:\n", max_new_tokens=12, temperature=1.0, top_k=20, seed=3)
    assert sampled == run.generate("MACBETH:\n", max_new_tokens=12, temperature=1.0, top_k=20, seed=3)
    long = run.generate("To be", max_new_tokens=40)  # runs past the 32-token context window
    assert len(run.tokenizer.encode(long)) >= 30
    with pytest.raises(ValueError, match="temperature"):
        run.generate("x", temperature=-1.0)
    with pytest.raises(ValueError, match="no checkpoint for step 7"):
        run.model_at(7)


def test_half_written_checkpoint_is_ignored(tmp_path):
    trainer = Trainer(tiny_config(tokens=8 * 32 * 4, checkpoint_every=2), tmp_path, docs())
    trainer.run(max_steps=2, progress=False)
    stale = tmp_path / "checkpoints" / ".step_0000004-interrupted"
    stale.mkdir()
    (stale / "params.npz").write_bytes(b"truncated")
    again = Trainer(tiny_config(tokens=8 * 32 * 4, checkpoint_every=2), tmp_path, docs())
    assert again.step_count == 2
    again.run(progress=False)
    assert not stale.exists() and sorted(ckpt.list_checkpoints(tmp_path / "checkpoints")) == [1, 2, 3, 4]


def test_bad_run_settings(tmp_path, resumed):
    out, _, _ = resumed
    with pytest.raises(ValueError, match="other settings"):
        Trainer(tiny_config(learning_rate=0.5), out, docs())
    with pytest.raises(ValueError, match="unknown scale"):
        Trainer(TrainConfig(scale="gigantic"), tmp_path, docs())
    with pytest.raises(FileNotFoundError, match="not a training run"):
        load_run(tmp_path / "empty")
