"""The fidelity-chosen compression (influence.index.choose): what it measures on its
probe is what the written index then scores, and it records it."""

from pathlib import Path

import numpy as np
import pytest

import influence as inf
from influence.index import Compression
from influence.index.choose import MIN_QUERY, choose_compression

QUIET = {"progress": False}


def _top10(approx, reference):
    a = np.argsort(-approx, axis=1, kind="stable")[:, :10]
    r = np.argsort(-reference, axis=1, kind="stable")[:, :10]
    return np.array([len(set(x) & set(y)) / 10 for x, y in zip(a, r)])


def test_fidelity_index_scores_as_its_probe_measured(mlp, tmp_path):
    model, task, factors, data, queries = mlp
    index = inf.build_index(model, task, factors, data, path=tmp_path / "index", compression="fidelity:0.9:int4",
                            probe=queries, batch_size=32, **QUIET)
    chosen = index.chosen
    assert chosen["reached"] and chosen["top10"] >= 0.9 and chosen["least_top10"] >= MIN_QUERY
    assert chosen["sample_rows"] == 96 and chosen["probe_queries"] == len(queries["x"])
    # The probe ranked every training row (96 < SAMPLE_ROWS): the written index must reproduce
    # the agreement the choice simulated, query by query (same selection, same int4 rounding).
    rescan = inf.pairwise_scores(model, task, factors, queries, data, batch_size=32, **QUIET).values
    answered = inf.pairwise_scores(model, task, factors, queries, None, index=index, **QUIET).values
    measured = _top10(answered, rescan)
    assert abs(measured.mean() - chosen["top10"]) <= 0.02, (measured.mean(), chosen)
    assert measured.min() >= MIN_QUERY - 0.1
    # it stores less than the full gradient, and each layer what the manifest says
    assert index.bytes_per_sequence == chosen["bytes_per_sequence"] < chosen["full_bytes_per_sequence"]
    for layer in index.layers:
        assert layer["width"] == round(chosen["layers"][layer["name"]]["share"] * layer["d_a"] * layer["d_out"])
    # Index.bytes counts every file the index wrote
    on_disk = sum(f.stat().st_size for f in Path(index.path).rglob("*") if f.is_file())
    assert index.bytes == on_disk
    # another host's part reuses this choice (its own probe would choose other maps, which a merge refuses)
    half = {k: v[48:] for k, v in data.items()}
    part = inf.build_index(model, task, factors, half, path=tmp_path / "part", compression=index, row_offset=48,
                           batch_size=32, **QUIET)
    assert part.compression == index.compression and part.chosen == chosen
    assert all(np.array_equal(part.maps[n][s], index.maps[n][s]) for n in index.maps for s in index.maps[n])


@pytest.mark.slow
def test_a_stricter_target_stores_more(mlp, tmp_path):
    model, task, factors, data, queries = mlp
    loose = inf.build_index(model, task, factors, data, path=tmp_path / "a", compression="fidelity:0.6:int4",
                            batch_size=32, **QUIET)
    strict = inf.build_index(model, task, factors, data, path=tmp_path / "b", compression="fidelity:1:int8",
                             batch_size=32, **QUIET)
    assert loose.chosen["probe"] == "held-out training rows"
    assert loose.chosen["bytes_per_sequence"] < strict.chosen["bytes_per_sequence"]
    assert strict.chosen["top10"] == 1.0 or not strict.chosen["reached"]


def test_a_byte_budget_caps_the_choice_and_says_it_missed(mlp):
    """``fidelity:<target>:<budget>:<dtype>``: the choice stops at the budget (a share of
    the full float32 bytes), records it and warns that the target was not reached."""
    model, task, factors, data, queries = mlp
    comp = Compression.parse("fidelity:1:0.02:int4")
    assert (comp.fraction, comp.budget, comp.dtype, str(comp)) == (1.0, 0.02, "int4", "fidelity:1:0.02:int4")
    with pytest.warns(UserWarning, match="within 0.02 of the full bytes"):
        chosen_comp, maps, chosen = choose_compression(model, task, factors, data, comp, probe=queries,
                                                       execution=inf.Execution(batch_size=32, progress=False))
    assert chosen["budget"] == 0.02 and not chosen["reached"]
    assert chosen["share_of_full"] <= 0.02 < 2 * chosen["share_of_full"]  # it spent the budget
    assert chosen["bytes_per_sequence"] == sum(4 + -(-len(m["keep"]) // 2) for m in maps.values())
    with pytest.raises(inf.ConfigError, match="budget"):
        Compression.parse("select:0.5:0.1:int4")
    with pytest.raises(inf.ConfigError, match="budget"):
        Compression("fidelity", 0.9, budget=1.5)
