"""The generated sections of docs/benchmarks.md, rendered from the committed results JSON.

  python -m experiments.validation.report            # rewrite the sections in place
  python -m experiments.validation.report --check    # exit 1 if a section differs

A section sits between ``<!-- begin generated: NAME -->`` and ``<!-- end generated: NAME -->``
in the page; everything between the markers is rendered here from ``docs/benchmarks/*.json``
(numbers and the sentences that carry them), so that no measured number is typed by hand.
``tests/experiments/test_benchmark_docs.py`` holds the page against the JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import influence as inf
from influence.capture import objectives

DOCS = Path("docs/benchmarks.md")
SRC = Path("docs/benchmarks")
FISHER_ORDER = ("sampled", "sampled*4", "sampled*16", "empirical", "exact")
FISHER_NAMES = {"sampled": "sampled, 1 draw", "sampled*4": "sampled, 4 draws", "sampled*16": "sampled, 16 draws",
                "empirical": "empirical", "exact": "exact", "-": "—"}
STRATEGY_NAMES = {"identity": "identity", "diagonal": "diagonal", "kfac": "K-FAC", "ekfac": "EK-FAC"}


def _fisher_label(spec: str) -> str:
    """``"sampled*4@1"`` → ``"sampled, 4 draws, key 1"``."""
    base, _, key = spec.partition("@")
    return FISHER_NAMES.get(base, base) + (f", key {key}" if key else "")


def _load(src: Path, name: str) -> dict:
    path = src / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the command the section names to write it")
    return json.loads(path.read_text())


def _sampler_note(res: dict) -> str:
    """Which sampler drew a softmax's sampled targets, when not the current one: results
    files written before ``CATEGORICAL_SAMPLER`` was recorded used ``jax.random.categorical``
    (a Gumbel draw); their sampled-Fisher rows are not what this code draws for the same
    key. Empty for a regression (its Gaussian draws did not change) or a current file."""
    if res.get("sampler") == inf.tasks.CATEGORICAL_SAMPLER or res.get("setting") == "diabetes":
        return ""
    return (" Sampled-Fisher rows measured with the earlier sampler (`jax.random.categorical`, a Gumbel draw "
            "per class), not re-run since the inverse-CDF sampler replaced it.")


def _row(rows, **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def _lds(rows, measurement, strategy, fisher, damping="default") -> str:
    r = _row(rows, measurement=measurement, strategy=strategy, fisher=fisher, damping=damping)
    return "—" if r is None else f"{r['lds']:.3f} ± {r['stderr']:.3f}"


def _value(rows, measurement, strategy, fisher, damping="default") -> float:
    r = _row(rows, measurement=measurement, strategy=strategy, fisher=fisher, damping=damping)
    if r is None:
        raise KeyError(f"no row {measurement}/{strategy}/{fisher}/{damping}")
    return r["lds"]


def _load_text(result: dict) -> str:
    return ", ".join(f"{v:.1f}" for v in result["load_average"])


def _fit_ratio(result: dict, strategy: str, fisher: str) -> str:
    times = {(r["strategy"], r["fisher"]): r["seconds"] for r in result.get("fit_seconds", [])}
    base = times.get((strategy, "sampled@1" if fisher.endswith("@1") else "sampled"))
    t = times.get((strategy, fisher))
    return "—" if base is None or t is None else f"{t / base:.1f}×"


def render_fisher(src: Path) -> str:
    """LDS of each Fisher (digits, diabetes, lm), their fit cost, and the default rule."""
    settings = [("digits", "margin", "lds-fisher-digits.json"), ("diabetes", "loss", "lds-fisher-diabetes.json"),
                ("lm", "loss", "lds-fisher-lm.json")]
    loaded = [(name, m, _load(src, f)) for name, m, f in settings if (src / f).exists() or name == "digits"]
    out = []
    for name, measurement, res in loaded:
        out.append(f"`{res['command']}` — {res['date']}, {res['machine']}, load average {_load_text(res)}, "
                   f"{res['seconds']:.0f} s: setting **{name}** ({measurement}; {res['subsets']} subsets × "
                   f"{len(res['seeds'])} retraining seeds {res['seeds']}; fitting key 0, and key 1 where marked)."
                   + _sampler_note(res))
        out.append("")
    out.append("| setting | Fisher | K-FAC | EK-FAC | EK-FAC at λ = 0.1 × mean Λ | EK-FAC fit ÷ 1-draw fit |")
    out.append("|---|---|---|---|---|---|")
    for name, measurement, res in loaded:
        common = [r["damping"] for r in res["rows"] if r["damping"].startswith("0.1×")]
        for fisher in [f for base in FISHER_ORDER for f in (base, f"{base}@1")]:
            if _row(res["rows"], strategy="ekfac", fisher=fisher) is None:
                continue
            fixed = _lds(res["rows"], measurement, "ekfac", fisher, common[0]) if common else "—"
            label = _fisher_label(fisher)
            out.append(f"| {name} | {label} | {_lds(res['rows'], measurement, 'kfac', fisher)} | "
                       f"{_lds(res['rows'], measurement, 'ekfac', fisher)} | {fixed} | "
                       f"{_fit_ratio(res, 'ekfac', fisher)} |")
    out.append("")
    out.append("(LDS ± standard error over queries, default damping 0.1 × mean Λ per layer unless stated; the "
               "column at λ = 0.1 × mean Λ uses one absolute λ for every Fisher — mean Λ of the 1-draw EK-FAC "
               "fit —, since each Fisher's own mean Λ differs (the empirical Fisher's is far smaller for a "
               "classifier that fits its labels). The fit-time column is measured on this small setting, where "
               "fixed costs weigh; the cost table below is the one to read for cost.)")
    out.append("")
    cost = _load(src, "fisher-cost.json")
    out.append(f"`{cost['command'].strip()}` — {cost['date']}, {cost['machine']}, jax {cost['jax']}, load average "
               f"{_load_text(cost)}, {cost['seconds']:.0f} s. EK-FAC fit time ÷ the 1-draw sampled fit (best of "
               f"{cost['repeats']} after compilation, side by side in one run)"
               + (". Measured with the earlier sampler of the sampled Fisher (`jax.random.categorical`, a Gumbel "
                  "draw per class, whose cost grew with the classes), not re-run since the inverse-CDF sampler "
                  "replaced it:" if cost.get("sampler") != inf.tasks.CATEGORICAL_SAMPLER else ":"))
    out.append("")
    out.append("| model | exact directions per example | " + " | ".join(FISHER_NAMES[f] for f in FISHER_ORDER) + " |")
    out.append("|---|---|" + "---|" * len(FISHER_ORDER))
    for row in cost["rows"]:
        ratios = " | ".join(f"{row['ratio_to_sampled'][f]:.1f}×" for f in FISHER_ORDER)
        out.append(f"| {row['model']} | {row['exact_directions']} | {ratios} |")
    out.append("")
    digits = loaded[0][2]["rows"]
    ek = {f: _value(digits, "margin", "ekfac", f) for f in FISHER_ORDER}
    kf = {f: _value(digits, "margin", "kfac", f) for f in FISHER_ORDER}
    within = max(cost["rows"], key=lambda r: r["exact_directions"] * (r["exact_directions"]
                                                                       <= objectives.EXACT_MAX_DIRECTIONS))
    spread = ""
    if _row(digits, strategy="ekfac", fisher="sampled@1") is not None:
        ek1 = {f: _value(digits, "margin", "ekfac", f"{f}@1") for f in ("sampled", "sampled*4", "sampled*16")}
        wider = all(ek["exact"] - max(ek[f], ek1[f]) > abs(ek[f] - ek1[f]) for f in ek1)
        spread = (f" With fitting key 1 instead of 0 the draws give {ek1['sampled']:.3f}, {ek1['sampled*4']:.3f} and "
                  f"{ek1['sampled*16']:.3f}" + (": for each, the gap to the exact Fisher is larger than the "
                                                 "key-to-key spread." if wider else "."))
    gains = "gains more" if kf["sampled*16"] - kf["sampled"] > ek["sampled*16"] - ek["sampled"] else "gains"
    out.append(
        f"On digits, more draws per example raise EK-FAC's LDS from {ek['sampled']:.3f} (one draw) to "
        f"{ek['sampled*4']:.3f} (4) and {ek['sampled*16']:.3f} (16); the exact Fisher gives {ek['exact']:.3f} and "
        f"the empirical {ek['empirical']:.3f}.{spread} K-FAC {gains} "
        f"from the draws ({kf['sampled']:.3f} → {kf['sampled*16']:.3f}; exact {kf['exact']:.3f}): its S is the "
        "factor the sampling noise hits. The exact Fisher is the "
        "limit of many draws without their noise, and costs one backward pass per direction, as a draw does: "
        f"with {within['exact_directions']} directions its fit took {within['ratio_to_sampled']['exact']:.1f}× "
        f"the 1-draw fit, against {within['ratio_to_sampled']['sampled*16']:.1f}× for 16 draws; beyond, it grows "
        "with the directions (" + ", ".join(f"{r['ratio_to_sampled']['exact']:.1f}× at {r['exact_directions']}"
                                            for r in cost["rows"] if r["model"].startswith("MLP")
                                            and r["exact_directions"] > objectives.EXACT_MAX_DIRECTIONS)
        + "), while 4 draws stay at " + "–".join(f"{v:.1f}×" for v in (
            min(r["ratio_to_sampled"]["sampled*4"] for r in cost["rows"]),
            max(r["ratio_to_sampled"]["sampled*4"] for r in cost["rows"]))) + ".")
    lm = [res for name, _, res in loaded if name == "lm"]
    if lm:
        rows = lm[0]["rows"]
        e = {f: _value(rows, "loss", "ekfac", f) for f in ("sampled", "sampled*4", "empirical")}
        k = {f: _value(rows, "loss", "kfac", f) for f in ("sampled", "sampled*4", "empirical")}
        out.append("")
        out.append(
            f"On the tiny language model ({lm[0]['key']['vocab_size']:,}-token vocabulary: the exact Fisher would "
            "need one backward pass per token of the vocabulary and position), 4 draws per sequence give EK-FAC "
            f"{e['sampled*4']:.3f} against {e['sampled']:.3f} for one draw and {e['empirical']:.3f} for the "
            f"empirical Fisher (K-FAC: {k['sampled*4']:.3f}, {k['sampled']:.3f}, {k['empirical']:.3f}), at "
            f"{_fit_ratio(lm[0], 'ekfac', 'sampled*4')} the one-draw EK-FAC fit time there"
            + (f"; the differences are within the standard errors over its {lm[0]['n_queries']} queries, so "
               "they point the same way as on digits without settling it." if max(
                   abs(e["sampled*4"] - e["sampled"]), abs(k["sampled*4"] - k["sampled"])) < max(
                   r["stderr"] for r in rows if r["strategy"] in ("kfac", "ekfac")) else "."))
    out.append("")
    out.append(
        f"**The default** (`fit_factors(fisher=None)`): the exact Fisher when the task has at most "
        f"{objectives.EXACT_MAX_DIRECTIONS} Fisher directions per example (classification with up to "
        f"{objectives.EXACT_MAX_DIRECTIONS} classes, regression with up to {objectives.EXACT_MAX_DIRECTIONS} "
        f"outputs), else the sampled Fisher with ⌈{objectives.DEFAULT_SAMPLES} / T⌉ draws per example for T "
        f"target tokens ({objectives.default_draws(1)} for one output per example, "
        f"{objectives.default_draws(127)} for a language model, whose T × V directions are too many and each of "
        "whose draws samples every token: see the tiny LM above), else the empirical Fisher (a loss that "
        "cannot sample; warned). `metadata[\"fisher\"]`, "
        "`[\"fisher_samples\"]` and `[\"fisher_rule\"]` record the choice; an explicit `fisher=` is used as given.")
    return "\n".join(out)


def render_kronfluence_cnn(src: Path) -> str:
    res = _load(src, "kronfluence-cnn.json")
    out = [f"`{res['command'].strip()}` — {res['date']}, {res['machine']}, jax {res['jax']}, torch "
           f"{res['torch_version']} with {res['threads']} threads, load average {_load_text(res)}. {res['model']}, "
           f"trained on {res['n_train']} digits; {res['n_queries']} held-out queries; batch {res['batch_size']}; "
           f"times fit + pairwise scores, best of {res['repeats']} after compilation.", ""]
    layers = list(res["rows"][0]["per_layer"])
    out.append("| strategy | ours | Fisher | damping | Pearson | Spearman | top-10 | ‖ours − theirs‖ / ‖theirs‖ | "
               + " | ".join(f"Pearson {n}" for n in layers) + " | ours (s) | kronfluence (s) |")
    out.append("|---|---|---|---|---|---|---|---|" + "---|" * len(layers) + "---|---|")
    for r in res["rows"]:
        lam = "0.1 × mean Λ" if r["damping"] is None else f"{r['damping']:g}"
        per = " | ".join(f"{r['per_layer'][n]['pearson']:.4f}" for n in layers)
        variant = "as is" if r["variant"] == "ours" else r["variant"].removeprefix("ours, ")
        out.append(f"| {STRATEGY_NAMES[r['strategy']]} | {variant} | {r['fisher']} | {lam} | {r['pearson']:.4f} | "
                   f"{r['spearman']:.4f} | {r['top10']:.2f} | {r['relative_difference']:.1e} | {per} | "
                   f"{r['ours_seconds']:.2f} | {r['kronfluence_seconds']:.2f} |")
    return "\n".join(out)


def render_lds_cnn(src: Path) -> str:
    res = _load(src, "lds-cnn.json")
    out = [f"`{res['command'].strip()}` — {res['date']}, {res['machine']}, load average {_load_text(res)}, "
           f"{res['seconds']:.0f} s (retraining {res['retrain_seconds']:.0f} s; 0 when the cache held the retrained "
           f"models). {res['subsets']} subsets × "
           f"{len(res['seeds'])} retraining seeds {res['seeds']}; α = {res['fraction']}; seed agreement of the "
           f"retrained margins {res['seed_agreement']['margin']:.3f}.{_sampler_note(res)}", ""]
    fishers = []
    for r in res["rows"]:
        if r["fisher"] != "-" and r["fisher"] not in fishers:
            fishers.append(r["fisher"])
    strategies = [s for s in STRATEGY_NAMES if _row(res["rows"], strategy=s) is not None]
    out.append("| Fisher | " + " | ".join(STRATEGY_NAMES[s] for s in strategies) + " |")
    out.append("|---|" + "---|" * len(strategies))
    for fisher in fishers:
        cells = [_lds(res["rows"], "margin", s, "-" if s == "identity" else fisher) for s in strategies]
        out.append(f"| {_fisher_label(fisher)} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("(margin, default damping; identity has no Fisher, so its column repeats.)")
    out.append("")
    rows = res["rows"]
    v = {s: _value(rows, "margin", s, "-" if s == "identity" else "exact") for s in strategies}
    se = {s_: _row(rows, measurement="margin", strategy=s_, fisher="-" if s_ == "identity" else "exact",
                   damping="default")["stderr"] for s_ in strategies}
    close = abs(v["ekfac"] - v["kfac"]) <= max(se["ekfac"], se["kfac"])
    out.append(f"With the exact Fisher (the default for this 10-class task), EK-FAC's LDS is {v['ekfac']:.3f} against "
               f"{v['identity']:.3f} for identity, {v['diagonal']:.3f} for the diagonal and {v['kfac']:.3f} for "
               "K-FAC" + ("; EK-FAC and K-FAC are within one standard error of each other." if close else "."))
    if "sampled@1" in fishers:
        out.append("")
        ek = [_value(rows, "margin", "ekfac", f) for f in fishers]
        kf = [_value(rows, "margin", "kfac", f) for f in fishers]
        keys = [_value(rows, "margin", s_, f) for s_ in ("ekfac", "kfac") for f in ("sampled", "sampled@1")]
        out.append(
            f"Across the Fishers, EK-FAC ranges over {min(ek):.3f}–{max(ek):.3f} and K-FAC over "
            f"{min(kf):.3f}–{max(kf):.3f}; two keys of the one-draw sampled Fisher alone differ by "
            f"{abs(keys[0] - keys[1]):.3f} (EK-FAC) and {abs(keys[2] - keys[3]):.3f} (K-FAC): on this CNN the "
            "Fisher moves the LDS by about as much as the sampling key does.")
    return "\n".join(out)

MAIN_SETTINGS = (("digits", "margin"), ("diabetes", "loss"), ("lm", "loss"))


def _mean_lambda_sweep(rows, measurement, strategy, fisher) -> dict[str, float]:
    """LDS at every damping of the sweep (``r×meanΛ``, ``2·wd``) and the default."""
    return {r["damping"]: r["lds"] for r in rows
            if r["measurement"] == measurement and r["strategy"] == strategy and r["fisher"] == fisher}


def render_lds_main(src: Path) -> str:
    """The commands, the table of LDS per strategy at the default damping for the three
    settings (digits, diabetes, lm), and the sentences that read it."""
    res = {s: _load(src, f"lds-{s}.json") for s, _ in MAIN_SETTINGS}
    out = ["Commands (each results file records its date, machine, load average and wall-clock seconds; the "
           "machine was shared with other jobs):", "", "```"]
    for s, _ in MAIN_SETTINGS:
        r = res[s]
        load = f", load average {_load_text(r)}" if r.get("load_average") else ""
        out.append(f"{r['command'].strip():<85} # {r['date']}, {r['seconds']:.0f} s{load}")
    out += ["python -m experiments.validation.plots" + " " * 48 + "# the figures below", "```", "",
            "LDS at the default damping (0.1 × mean Λ per layer), α = 0.5:", "",
            "| setting | M × seeds | identity | diagonal | K-FAC | EK-FAC | K-FAC, exact Fisher | EK-FAC, exact Fisher "
            "| one seed vs another |", "|---|---|---|---|---|---|---|---|---|"]
    for s, m in MAIN_SETTINGS:
        r, rows = res[s], res[s]["rows"]
        ek = _lds(rows, m, "ekfac", "sampled")
        out.append(f"| {s} ({m}) | {r['subsets']} × {len(r['seeds'])} | {_lds(rows, m, 'identity', '-')} | "
                   f"{_lds(rows, m, 'diagonal', 'sampled')} | {_lds(rows, m, 'kfac', 'sampled')} | **{ek}** | "
                   f"{_lds(rows, m, 'kfac', 'exact')} | {_lds(rows, m, 'ekfac', 'exact')} | "
                   f"{r['seed_agreement'][m]:.3f} |")
    notes = [f"the {s} file's: {_sampler_note(res[s]).strip()}" for s, _ in MAIN_SETTINGS if _sampler_note(res[s])]
    out += ["", "(Fisher: sampled, one draw per example, unless marked; the exact Fisher needs one backward pass "
            "per output and token, impractical for a 4,096-token vocabulary. The last column is the Spearman "
            "correlation over subsets between the measurements of two single retrained models that differ only "
            "in their seed, averaged over queries." + (" Sampler: " + "; ".join(notes) if notes else "") + ")"]
    return "\n".join(out)


def render_lds_findings(src: Path) -> str:
    """What the main LDS table shows, each number read from the results files."""
    res = {s: _load(src, f"lds-{s}.json") for s, _ in MAIN_SETTINGS}
    v = {s: {k: _value(res[s]["rows"], m, k, "-" if k == "identity" else "sampled")
             for k in ("identity", "diagonal", "kfac", "ekfac")} for s, m in MAIN_SETTINGS}
    se = {s: _row(res[s]["rows"], measurement=m, strategy="ekfac", fisher="sampled", damping="default")["stderr"]
          for s, m in MAIN_SETTINGS}
    dig = res["digits"]["rows"]
    exact = {k: _value(dig, "margin", k, "exact") for k in ("kfac", "ekfac")}
    lines = ["- **EK-FAC against identity**: " + ", ".join(
        f"{v[s]['ekfac']:.2f} against {v[s]['identity']:.2f} ({s})" for s, _ in MAIN_SETTINGS) + ". For orientation, "
        "dattri reports LDS ≈ 0.26 for CG influence on an MNIST MLP, and kronfluence 0.44 (EK-FAC) against 0.12 "
        "(identity) on GPT-2/WikiText-2."]
    behind = [s for s in ("digits", "lm") if v[s]["ekfac"] - v[s]["kfac"] > se[s]]
    lines.append(
        "- **K-FAC against EK-FAC with the sampled Fisher**: " + ", ".join(
            f"{v[s]['kfac']:.2f} against {v[s]['ekfac']:.2f} ({s})" for s in ("digits", "lm"))
        + (f"; K-FAC falls behind by more than EK-FAC's standard error on {' and '.join(behind)}" if behind else
           "; within EK-FAC's standard error")
        + f". With the exact Fisher on digits: K-FAC {exact['kfac']:.2f}, EK-FAC {exact['ekfac']:.2f}. A single "
          "sampled label per example makes the gradient covariance S noisy for a confident classifier "
          "(docs/method.md measures the error of one fit's diagonal); EK-FAC refits its eigenvalues from "
          "per-example gradients and so can absorb part of that noise, which K-FAC cannot.")
    gaps, big, wd = [], [], []
    for s, m in MAIN_SETTINGS:
        sweep = _mean_lambda_sweep(res[s]["rows"], m, "ekfac", "sampled")
        gaps.append(max(sweep.values()) - sweep["default"])
        big.append(f"{sweep['10×meanΛ']:.2f} ({s})")
        if "2·wd" in sweep:
            wd.append(f"{sweep['2·wd']:.2f} against {sweep['default']:.2f} ({s})")
    lines.append(
        f"- **Damping**: for EK-FAC the default (0.1 × mean Λ) is within {max(gaps):.3f} of the best λ of the sweep "
        f"in every setting (see the figure). Large damping pulls every method towards the "
        f"identity ranking (λ = 10 × mean Λ: {', '.join(big)}). The λ implied by the weight decay (2 × 1e-3): "
        f"{'; '.join(wd)}.")
    margin = {(r["strategy"], r["fisher"], r["damping"]): r["lds"] for r in dig if r["measurement"] == "margin"}
    loss = {(r["strategy"], r["fisher"], r["damping"]): r["lds"] for r in dig if r["measurement"] == "loss"}
    diff = max(abs(margin[k] - loss[k]) for k in margin if k in loss)
    lines.append(
        f"- **Margin or loss on digits** (the file has both): the largest difference over its rows is {diff:.1e}. "
        "For this margin m = logsumexp_{k≠y} − logit_y, the loss is softplus(m), a monotone function of it, whose "
        "gradient is σ(m) ∇m: per query the retrained measurements and the scores keep their ranks, so each "
        "query's Spearman correlation is (nearly) the same.")
    rho = res["diabetes"]["seed_agreement"]["loss"]
    n_seeds = len(res["diabetes"]["seeds"])
    sb = n_seeds * rho / (1 + (n_seeds - 1) * rho)
    lines.append(
        f"- **Diabetes is hard for every method** because retraining it is dominated by the seed: two single models "
        f"agree only at {rho:.2f} over the subsets. The {n_seeds}-seed mean is a stable target (Spearman-Brown "
        f"reliability {n_seeds}·{rho:.2f}/(1 + {n_seeds - 1}·{rho:.2f}) = {sb:.2f}), so the low LDS is not noise in "
        "the target: influence, a linearisation around one trained model, predicts the seed-averaged response "
        f"poorly when models differ this much. Diagonal {v['diabetes']['diagonal']:.2f} against identity "
        f"{v['diabetes']['identity']:.2f}; K-FAC {v['diabetes']['kfac']:.2f}, EK-FAC {v['diabetes']['ekfac']:.2f}.")
    lines.append(
        f"- **The diagonal on the language model**: {v['lm']['diagonal']:.2f} against identity "
        f"{v['lm']['identity']:.2f}. The tracked parameters span very different scales (the 4,096-way head against "
        "the block), and even a diagonal preconditioner likely removes much of that (in the block's layers alone "
        "it does not help: see the IHVP section).")
    return "\n".join(lines)


def render_in_short(src: Path) -> str:
    """The summary table at the top of the page: the same numbers as the sections below
    (LDS per setting, the PBRF at λ = mean Λ and ε = 1/N, the IHVP cosine at the default
    damping), each read from its results file, with EK-FAC in bold."""
    res = {s: _load(src, f"lds-{s}.json") for s, _ in MAIN_SETTINGS}
    pbrf = [r for r in _load(src, "pbrf.json")["rows"] if r["damping_factor"] == 1.0 and r["epsilon_times_n"] == 1.0]
    ihvp = next(r for r in _load(src, "ihvp.json")["results"] if r["damping_scale"] == 1.0)
    labels = {"digits": "LDS, digits MLP (margin; {m} subsets × {s} seeds)", "diabetes": "LDS, diabetes regression "
              "MLP ({m} × {s})", "lm": "LDS, tiny transformer on Shakespeare ({m} × {s})"}
    order = ("identity", "diagonal", "kfac", "ekfac")

    def line(label: str, values: dict) -> str:
        cells = [f"{values[k]:.2f}" for k in order]
        cells[-1] = f"**{cells[-1]}**"
        return f"| {label} | " + " | ".join(cells) + " |"

    out = ["| check | identity | diagonal | K-FAC | EK-FAC |", "|---|---|---|---|---|"]
    for s, m in MAIN_SETTINGS:
        r = res[s]
        values = {k: _value(r["rows"], m, k, "-" if k == "identity" else "sampled") for k in order}
        out.append(line(labels[s].format(m=r["subsets"], s=len(r["seeds"])), values))
    fisher = {k: "-" if k == "identity" else "sampled" for k in order}
    out.append(line("PBRF, Pearson (MLP, λ = mean Λ, ε = 1/N)",
                    {k: _row(pbrf, strategy=k, fisher=fisher[k])["pearson"] for k in order}))
    out.append(line("IHVP cosine with CG (tiny transformer, default damping)",
                    {k: _row(ihvp["rows"], strategy=k)["cosine"] for k in order}))
    return "\n".join(out)


SECTIONS: dict[str, Callable[[Path], str]] = {
    "in-short": render_in_short,
    "lds-main": render_lds_main,
    "lds-findings": render_lds_findings,
    "fisher": render_fisher,
    "kronfluence-cnn": render_kronfluence_cnn,
    "lds-cnn": render_lds_cnn,
}
_BLOCK = re.compile(r"<!-- begin generated: (?P<name>[\w-]+) -->\n(?P<body>.*?)\n?<!-- end generated: (?P=name) -->",
                    re.S)


def sections(text: str) -> dict[str, str]:
    """``{name: body}`` of the generated sections of a page."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text)}


def render(text: str, src: Path = SRC) -> str:
    """``text`` with every generated section rendered afresh from ``src``."""
    def replace(m):
        if m["name"] not in SECTIONS:
            raise KeyError(f"unknown generated section {m['name']!r}; known: {sorted(SECTIONS)}")
        name = m["name"]
        return f"<!-- begin generated: {name} -->\n{SECTIONS[name](src)}\n<!-- end generated: {name} -->"

    return _BLOCK.sub(replace, text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a section is stale")
    parser.add_argument("--page", type=Path, default=DOCS)
    parser.add_argument("--src", type=Path, default=SRC)
    args = parser.parse_args(argv)
    text = args.page.read_text()
    new = render(text, args.src)
    if args.check:
        stale = [n for n, body in sections(new).items() if sections(text).get(n) != body]
        if stale:
            print(f"stale generated sections in {args.page}: {stale}; run python -m experiments.validation.report")
            sys.exit(1)
        return
    args.page.write_text(new)
    print(f"rendered {sorted(sections(new))} in {args.page}")


if __name__ == "__main__":
    main()
