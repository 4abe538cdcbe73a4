"""The PyTorch half of ``benchmarks.kronfluence_compare``: kronfluence 1.0.1 on the same MLP.

Run by ``kronfluence_compare`` in a separate interpreter that has torch (CPU) and
kronfluence installed (never the package's own environment)::

  python benchmarks/kronfluence_side.py IN.npz OUT.npz

``IN.npz`` holds the MLP's layers (``kernel{i}`` [d_in, d_out] in flax layout, ``bias{i}``;
with ``model="cnn"``, the digits CNN's two conv kernels ``[k1, k2, c_in, c_out]`` then its
two linear kernels; ``per_module`` asks for each layer's scores too, ``scores_<name>``),
``train_x``, ``train_y``, ``query_x``, ``query_y`` and the settings (``strategy``,
``fisher``, ``damping`` (NaN for kronfluence's 0.1 × mean Λ), ``batch_size``,
``activation``). ``OUT.npz`` receives ``scores [Q, N]`` and the wall times of fitting
and scoring (``fit_seconds``, ``score_seconds``), each the best of ``repeats`` runs.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn


class MLP(nn.Module):
    def __init__(self, kernels, biases, activation):
        super().__init__()
        self.layers = nn.ModuleList()
        for k, b in zip(kernels, biases):
            layer = nn.Linear(k.shape[0], k.shape[1])
            with torch.no_grad():  # torch keeps weights as [d_out, d_in]
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.T)))
                layer.bias.copy_(torch.from_numpy(b))
            self.layers.append(layer)
        self.activation = {"relu": torch.relu, "tanh": torch.tanh}[activation]

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class CNN(nn.Module):
    """The digits CNN of ``experiments.validation.settings.DigitsCNN`` on the same weights:
    two 3×3 convolutions with padding 1 (flax's ``SAME`` at stride 1), then two linear
    layers. Flax keeps images NHWC and conv kernels ``[k1, k2, c_in, c_out]``; torch NCHW
    and ``[c_out, c_in, k1, k2]``. The activations are put back in NHWC order before the
    flatten, so the first linear layer takes flax's (row, column, channel) order as is."""

    def __init__(self, kernels, biases, activation):
        super().__init__()
        (k1, k2, k3, k4), (b1, b2, b3, b4) = kernels, biases
        self.conv1 = nn.Conv2d(k1.shape[2], k1.shape[3], k1.shape[:2], padding=1)
        self.conv2 = nn.Conv2d(k2.shape[2], k2.shape[3], k2.shape[:2], padding=1)
        self.fc1 = nn.Linear(k3.shape[0], k3.shape[1])
        self.fc2 = nn.Linear(k4.shape[0], k4.shape[1])
        with torch.no_grad():
            for conv, k, b in ((self.conv1, k1, b1), (self.conv2, k2, b2)):
                conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))))
                conv.bias.copy_(torch.from_numpy(b))
            for fc, k, b in ((self.fc1, k3, b3), (self.fc2, k4, b4)):
                fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.T)))
                fc.bias.copy_(torch.from_numpy(b))
        self.activation = {"relu": torch.relu, "tanh": torch.tanh}[activation]

    def forward(self, x):
        act = self.activation
        h = x.reshape(-1, 1, 8, 8)  # one channel: NCHW and NHWC hold the same numbers
        h = act(self.conv2(act(self.conv1(h))))
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # flax's NHWC flatten order
        return self.fc2(act(self.fc1(h)))


class Classification(Task):
    """Summed softmax cross-entropy; sampled labels for the true Fisher, as the kronfluence examples do."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


def main(src: str, dst: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's GradScaler deprecation, inside kronfluence
    arrays = np.load(src)
    n_layers = int(arrays["n_layers"])
    kernels = [arrays[f"kernel{i}"] for i in range(n_layers)]
    biases = [arrays[f"bias{i}"] for i in range(n_layers)]
    torch.manual_seed(0)
    task = Classification()
    kind = str(arrays["model"]) if "model" in arrays.files else "mlp"
    network = (CNN if kind == "cnn" else MLP)(kernels, biases, str(arrays["activation"]))
    model = prepare_model(network.eval(), task)
    per_module = bool(arrays["per_module"]) if "per_module" in arrays.files else False
    train = torch.utils.data.TensorDataset(torch.from_numpy(arrays["train_x"]),
                                           torch.from_numpy(arrays["train_y"]).long())
    queries = torch.utils.data.TensorDataset(torch.from_numpy(arrays["query_x"]),
                                             torch.from_numpy(arrays["query_y"]).long())
    damping = float(arrays["damping"])
    batch = int(arrays["batch_size"])
    batch = batch or None  # 0: kronfluence's default, its search for an executable batch size
    repeats = int(arrays["repeats"])
    factor_args = FactorArguments(strategy=str(arrays["strategy"]),
                                  use_empirical_fisher=str(arrays["fisher"]) == "empirical")
    score_args = ScoreArguments(damping_factor=None if np.isnan(damping) else damping,
                                compute_per_module_scores=per_module)
    fit_times, score_times = [], []
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("compare", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out)
        for _ in range(repeats):
            t0 = time.perf_counter()
            analyzer.fit_all_factors("factors", dataset=train, per_device_batch_size=batch, factor_args=factor_args,
                                     overwrite_output_dir=True)
            fit_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            analyzer.compute_pairwise_scores("scores", factors_name="factors", query_dataset=queries,
                                             train_dataset=train, per_device_query_batch_size=len(queries),
                                             per_device_train_batch_size=batch, score_args=score_args,
                                             overwrite_output_dir=True)
            score_times.append(time.perf_counter() - t0)
        loaded = analyzer.load_pairwise_scores("scores")
        modules = {f"scores_{name}": v.numpy() for name, v in loaded.items()} if per_module else {}
        scores = sum(modules.values()) if per_module else loaded["all_modules"].numpy()
    np.savez(dst, scores=scores, **modules, fit_seconds=min(fit_times), score_seconds=min(score_times),
             first_fit_seconds=fit_times[0], first_score_seconds=score_times[0], threads=torch.get_num_threads(),
             torch_version=torch.__version__)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
