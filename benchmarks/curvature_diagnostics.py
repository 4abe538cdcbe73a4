"""Why approximations and exact influence differ: per-layer block errors and spectra.

For the settings of ``benchmarks.exact_agreement`` prints, per tracked layer, the relative
Frobenius error of the K-FAC and EK-FAC blocks (exact Fisher) against the exact
Gauss-Newton block, the share of the block's eigenvalues below 10⁻³ of its largest, and
how well exact *block-diagonal* influence agrees with exact full influence (what any
per-layer method gives up).

  python -m benchmarks.curvature_diagnostics
"""

from __future__ import annotations

import numpy as np

import influence as inf
from benchmarks.exact_agreement import agreement
from influence import tasks
from influence.capture.tracking import track
from influence.reference.exact import exact_scores, gauss_newton, layer_slices
from influence.testing import trained_lm, trained_mlp


def main() -> None:
    print("| setting | layer | K-FAC block error | EK-FAC block error | eigenvalues < 1e-3·max |")
    print("|---|---|---|---|---|")
    notes = []
    for setting in ("mlp", "lm"):
        if setting == "mlp":
            (model, data, queries), task, layers = trained_mlp(16, 512, 300), tasks.Classification(), None
        else:
            (model, data, queries), task, layers = trained_lm(128, 300), tasks.CausalLM(), "mlp"
        gn = gauss_newton(model, task, data, layers=layers)
        kfac = inf.fit_factors(model, task, data, strategy="kfac", fisher="exact", layers=layers, progress=False)
        ekfac = inf.fit_factors(model, task, data, strategy="ekfac", fisher="exact", layers=layers, progress=False)
        for name, sl in layer_slices(track(model, layers)).items():
            block = gn[sl, sl]
            errors = []
            for factors in (kfac, ekfac):
                c = factors.layers[name]
                q = np.kron(c.q_a.astype(np.float64), c.q_s.astype(np.float64))
                approx = q @ np.diag(c.eigenvalues.ravel().astype(np.float64)) @ q.T
                errors.append(np.linalg.norm(approx - block) / np.linalg.norm(block))
            eig = np.linalg.eigvalsh(block)
            print(f"| {setting} | {name} | {errors[0]:.2f} | {errors[1]:.2f} | {np.mean(eig < 1e-3 * eig.max()):.0%} |")
        damping = 0.1 * float(np.mean([c.eigenvalues.mean() for c in ekfac.layers.values()]))
        full = exact_scores(model, task, queries, data, damping=damping, layers=layers)
        block = exact_scores(model, task, queries, data, damping=damping, layers=layers, block_diagonal=True)
        sp, pe, top = agreement(block, full)
        notes.append(f"{setting}: exact block-diagonal vs exact full influence at λ = {damping:.2g}: "
                     f"Spearman {sp:.3f}, Pearson {pe:.3f}, top-10 {top:.2f}")
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
