"""The linear probe (megaclip.probe): its fit against Newton's method on the same objective, its
accuracy on hand-made sets whose answer is known, and DP ranks against one process."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from megaclip import distributed
from megaclip.probe import TOLERANCE_GRAD, fit_half, fit_logistic_regression, probe_accuracy
from megaclip.zeroshot import evaluate_zeroshot
from tests.distributed import run_distributed

CPU, NO_AUTOCAST = torch.device("cpu"), contextlib.nullcontext()


def newton_reference(x, y, num_classes, steps=12):
    """The same objective (mean cross-entropy + ‖W‖²/(2n)) minimised by Newton's method on the flat
    parameters with torch's exact Hessian: (weight, bias, the Hessian's least eigenvalue off its null
    direction). The bias is unpenalised, so the Hessian is singular along a common shift of the bias;
    its pseudo-inverse keeps the iterates, started at zero, off that direction, as L-BFGS's are (every
    gradient's bias part sums to zero)."""
    n, d = x.shape

    def objective(flat):
        weight, bias = flat[:num_classes * d].view(num_classes, d), flat[num_classes * d:]
        return F.cross_entropy(x @ weight.T + bias, y) + weight.pow(2).sum() / (2 * n)
    flat = torch.zeros(num_classes * (d + 1), dtype=torch.float64)
    for _ in range(steps):  # quadratic convergence from a start this close: a dozen is plenty
        gradient = torch.func.grad(objective)(flat)
        flat = flat - torch.linalg.pinv(torch.func.hessian(objective)(flat)) @ gradient
    eigenvalues = torch.linalg.eigvalsh(torch.func.hessian(objective)(flat))
    return flat[:num_classes * d].view(num_classes, d), flat[num_classes * d:], float(eigenvalues[1])


def overlapping_classes(n=60, d=3, classes=3, seed=0):
    """Gaussian clusters close enough to overlap, so the fitted weights stay finite without the penalty
    doing all the work."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g)
    return (centres[y] + torch.randn(n, d, generator=g)).double(), y


def test_fit_equals_newtons_method():
    x, y = overlapping_classes()
    weight, bias = fit_logistic_regression(x, y, 3)
    expected_weight, expected_bias, curvature = newton_reference(x, y, 3)
    # Both minimise one convex function in float64, strongly convex off the bias's common shift with
    # modulus `curvature` (the Hessian's least eigenvalue but the null one): Newton ends at float64
    # rounding, L-BFGS where its largest gradient element is below TOLERANCE_GRAD, so within
    # |Δθ| ≤ ‖g‖/curvature ≤ sqrt(12)·TOLERANCE_GRAD/curvature of the minimum; a margin of five.
    bound = 5 * 12 ** 0.5 * TOLERANCE_GRAD / curvature
    assert bound < 1e-3  # a meaningful comparison: the weights are of order 1
    torch.testing.assert_close(weight, expected_weight, rtol=0, atol=bound)
    torch.testing.assert_close(bias, expected_bias, rtol=0, atol=bound)
    assert abs(float(bias.sum())) < 1e-9  # centred, as argued in newton_reference


def separable_set(n=200, classes=4, seed=1):
    """Each class a tight cluster round its own axis; keys as sample names."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    features = F.one_hot(labels, 8).float() * 3 + 0.05 * torch.randn(n, 8, generator=g)
    return features, labels, [f"sample-{i:05d}" for i in range(n)]


def test_separable_set_with_known_accuracy():
    features, labels, keys = separable_set()
    fit = fit_half(keys)
    assert 0.4 < fit.float().mean() < 0.6  # the hash splits roughly in half
    assert probe_accuracy(features, labels, keys, 4) == {"top1": 1.0, "images": int((~fit).sum())}
    # Relabel every third scored sample to the next class: the probe, fitted on the clean half, still
    # names the cluster, so exactly those count as wrong.
    scored = (~fit).nonzero().flatten()
    flipped = scored[::3]
    noisy = labels.clone()
    noisy[flipped] = (noisy[flipped] + 1) % 4
    result = probe_accuracy(features, noisy, keys, 4)
    assert result["top1"] == pytest.approx(1 - len(flipped) / len(scored), abs=1e-12)


def test_probe_on_a_pass_of_zeroshot_evaluation():
    """evaluate_zeroshot(probe=True) reports the probe on the same images' normalized features."""
    features, labels, keys = separable_set()
    model = torch.nn.Module()
    model.encode_image = lambda images: F.normalize(images, dim=-1)
    batches = [(features[i:i + 64], labels[i:i + 64], keys[i:i + 64]) for i in range(0, 200, 64)]
    results = evaluate_zeroshot(model, torch.eye(8)[:, :4], batches, CPU, NO_AUTOCAST, probe=True)
    expected = probe_accuracy(F.normalize(features, dim=-1), labels, keys, 4)
    assert results["probe_top1"] == expected["top1"] == 1.0 and results["probe_images"] == expected["images"]
    with pytest.raises(ValueError, match="needs .images, labels, keys. batches"):
        evaluate_zeroshot(model, torch.eye(8)[:, :4], [(features, labels)], CPU, NO_AUTOCAST, probe=True)


def overlapping_set():
    x, y = overlapping_classes(n=300, d=6, classes=5, seed=3)
    return x.float(), y, [f"img{i}.jpg" for i in torch.randperm(300, generator=torch.Generator().manual_seed(4))]


def _my_share():
    features, labels, keys = overlapping_set()
    mine = [slice(0, 170), slice(170, None), slice(0, 0)][distributed.dp_rank()]  # uneven shares, one empty
    return probe_accuracy(features[mine], labels[mine], keys[mine], 5, distributed.dp_group())


def test_three_data_parallel_ranks_equal_one_process():
    features, labels, keys = overlapping_set()
    single = probe_accuracy(features, labels, keys, 5)
    assert 0.3 < single["top1"] < 1  # overlapping clusters: neither chance nor perfect
    # The gathered samples are ordered by key on every layout: the fit sees the same float64 inputs in
    # the same order, and the accuracy is a count, so it is the same number.
    assert run_distributed(_my_share, 3) == [single] * 3
