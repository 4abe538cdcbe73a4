"""Checkpoint files: the checksummed format round-trips, plain .npz files of older runs
still load, damaged files are refused, and an interrupted write leaves nothing behind."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from influence.errors import FileFormatError
from influence.lm import GPTConfig, init_model
from influence.lm import checkpoint as ckpt
from influence.runtime import io


@pytest.fixture(scope="module")
def trees():
    """Parameters and AdamW state of a tiny GPT, moved off their initial values."""
    model = init_model(GPTConfig(vocab_size=40, context_length=16, d_model=16, n_layers=1, n_heads=2))
    params = nnx.split(model, nnx.Param, ...)[1]
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _assert_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_tagged_files_round_trip(trees, tmp_path):
    params, opt_state = trees
    ckpt.save_tree(tmp_path / "params.npz", params, ckpt.PARAMS_KIND)
    ckpt.save_tree(tmp_path / "opt_state.npz", opt_state, ckpt.OPT_STATE_KIND)
    arrays, _ = io.load_arrays(tmp_path / "params.npz", ckpt.PARAMS_KIND)  # the library's format
    assert "['blocks'][0]['mlp']['fc_in']['kernel']" in arrays
    _assert_identical(ckpt.load_tree(tmp_path / "params.npz", params, ckpt.PARAMS_KIND), params)
    _assert_identical(ckpt.load_tree(tmp_path / "opt_state.npz", opt_state, ckpt.OPT_STATE_KIND), opt_state)
    with pytest.raises(FileFormatError, match="expected 'influence-lm-opt-state'"):
        ckpt.load_tree(tmp_path / "params.npz", opt_state, ckpt.OPT_STATE_KIND)


def test_plain_npz_of_older_runs_still_loads(trees, tmp_path):
    params, opt_state = trees
    for name, tree in (("params.npz", params), ("opt_state.npz", opt_state)):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        # What earlier versions wrote: np.savez of every leaf under its keystr path.
        np.savez(tmp_path / name, **{jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in leaves})
    _assert_identical(ckpt.load_tree(tmp_path / "params.npz", params, ckpt.PARAMS_KIND), params)
    _assert_identical(ckpt.load_tree(tmp_path / "opt_state.npz", opt_state, ckpt.OPT_STATE_KIND), opt_state)


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "plain"])
def test_truncated_or_missing_file_raises_file_format_error(trees, tmp_path, tagged):
    params, _ = trees
    path = tmp_path / "params.npz"
    if tagged:
        ckpt.save_tree(path, params, ckpt.PARAMS_KIND)
    else:
        np.savez(path, **ckpt._flatten(params))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="params.npz"):
        ckpt.load_tree(path, params, ckpt.PARAMS_KIND)
    with pytest.raises(FileFormatError):
        ckpt.load_tree(tmp_path / "absent.npz", params, ckpt.PARAMS_KIND)


def test_interrupted_checkpoint_leaves_nothing_under_its_name(trees, tmp_path, monkeypatch):
    params, opt_state = trees
    root = tmp_path / "checkpoints"
    run_file = tmp_path / "run.json"
    run_file.write_text("{}")
    first = ckpt.save_checkpoint(root, 1, params, opt_state, {"elapsed_s": 0.0}, [run_file])
    assert sorted(p.name for p in first.iterdir()) == ["opt_state.npz", "params.npz", "run.json", "state.json"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "copy2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 2, params, opt_state, {"elapsed_s": 1.0}, [run_file])
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_0000001"]
    assert ckpt.latest_checkpoint(root) == first

    # Leftovers of writes killed outright (no cleanup ran) are removed with old checkpoints.
    (root / ".step_0000002-abc123").mkdir()
    (root / ".latest.json.xyz.tmp").write_text("{")
    (root / ".latest.json-old").write_text("{")
    ckpt.remove_stale(root, keep={1})
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_0000001"]
