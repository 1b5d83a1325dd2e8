"""Linear probe: how well a logistic regression on frozen image features names the labels of a
labelled split (the synthetic colour/shape labels, an image folder, labelled shards).

Every DP rank extracts the features of its share; they are gathered, ordered by sample key, and each
rank fits the same probe on the samples whose key hashes even and scores it on the others. The halves
and the order depend on the keys only, so every TP/DP layout fits on the same samples in the same
order (the features themselves differ by their rounding only).

The probe is multinomial logistic regression penalised as scikit-learn's LogisticRegression is by
default (C = 1: summed cross-entropy + ½‖W‖², the intercept free), fitted full-batch by torch's L-BFGS
in float64 from zero. The objective is strictly convex but for a common shift of the intercepts, which
changes no prediction and which L-BFGS never takes from zero (every gradient's intercept part sums to
zero), so the fit is unique and deterministic. Written with torch because scikit-learn is not a
dependency and the fit is a few lines.
"""
from __future__ import annotations

import zlib
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

# L-BFGS stops when the largest gradient element of the mean objective is below TOLERANCE_GRAD (the
# accuracy settles long before; tighter costs hundreds of iterations more), or after MAX_ITERATIONS
# (scikit-learn's default is 100)
MAX_ITERATIONS = 500
TOLERANCE_GRAD = 1e-7


def fit_half(keys: Sequence[str]) -> torch.Tensor:
    """True for the samples the probe is fitted on: about half, chosen by a hash of the key (crc32, the
    same in every process, unlike Python's hash)."""
    return torch.tensor([zlib.crc32(key.encode()) % 2 == 0 for key in keys], dtype=torch.bool)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                            inverse_regularisation: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, D], bias [C]) minimising Σᵢ CE(W xᵢ + b, yᵢ) + ‖W‖² / (2 C_reg), in float64 on the
    features' device. The objective is divided by the sample count, which leaves the minimum in place
    and makes L-BFGS's tolerances independent of the set's size."""
    x, y = features.double(), labels.to(features.device)
    weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=MAX_ITERATIONS, tolerance_grad=TOLERANCE_GRAD,
                                  tolerance_change=0, history_size=10, line_search_fn="strong_wolfe")
    penalty = 1 / (2 * inverse_regularisation * len(x))

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss
    optimizer.step(objective)
    return weight.detach(), bias.detach()


def _gathered(features: torch.Tensor, labels: torch.Tensor, keys: List[str], dp_group):
    mine = (features.cpu(), labels.cpu(), list(keys))
    shares = [mine]
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        shares = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(shares, mine, group=dp_group)
    shares = [s for s in shares if s[2]] or [mine]  # a rank with no images holds a (0, 0) placeholder
    features = torch.cat([s[0] for s in shares])
    labels = torch.cat([s[1] for s in shares])
    keys = [k for s in shares for k in s[2]]
    order = sorted(range(len(keys)), key=keys.__getitem__)  # stable: samples with equal keys keep rank order
    return features[order], labels[order], [keys[i] for i in order]


@torch.no_grad()
def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, keys: List[str], num_classes: int,
                   dp_group=None, device=None) -> Dict[str, float]:
    """This rank's share of (features, labels, keys) -> {"top1": the probe's accuracy on the scored half,
    "images": how many were scored}, the same on every rank of dp_group."""
    features, labels, keys = _gathered(features, labels, keys, dp_group)
    fit = fit_half(keys)
    if not fit.any() or fit.all():
        return {"top1": 0.0, "images": 0}
    device = device or features.device
    with torch.enable_grad():
        weight, bias = fit_logistic_regression(features[fit].to(device), labels[fit], num_classes)
    scored = features[~fit].to(device).double()
    predicted = (scored @ weight.T + bias).argmax(dim=1).cpu()
    return {"top1": (predicted == labels[~fit]).double().mean().item(), "images": int((~fit).sum())}
