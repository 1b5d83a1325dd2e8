"""Retrieval and zero-shot metrics against brute-force references, alone and over 2 DP ranks."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megaclip import distributed
from megaclip.data.eval_loader import EvalBatch
from megaclip.evaluate import evaluate_retrieval, retrieval_metrics
from megaclip.zeroshot import (OPENAI_TEMPLATES, evaluate_zeroshot, image_folder_batches, read_class_names,
                               read_templates, synthetic_task, topk_correct, zeroshot_classifier)
from tests.data_helpers import noise_image
from tests.distributed import run_distributed

CPU, NO_AUTOCAST = torch.device("cpu"), contextlib.nullcontext()


class FeatureModel(nn.Module):
    """Stands in for CLIPModel: an "image" is its own feature row, token t[0] picks a text feature row."""

    def __init__(self, text_features: torch.Tensor):
        super().__init__()
        self.text = nn.Module()
        self.text.text_projection = nn.Parameter(torch.zeros(1, text_features.shape[1]))
        self.text_features = text_features

    def encode_image(self, images):
        return images

    def encode_text(self, tokens):
        return self.text_features[tokens[:, 0]]


class PromptTokenizer:
    """Token row [i] for the i-th prompt it has ever seen."""

    def __init__(self):
        self.ids = {}

    def __call__(self, texts):
        return torch.tensor([[self.ids.setdefault(t, len(self.ids))] for t in texts])


def eval_batches(images, caption_image, batch_size):
    """EvalBatches of images (feature rows) whose caption c has token id c."""
    for start in range(0, len(images), batch_size):
        rows = range(start, min(start + batch_size, len(images)))
        captions = [c for c in range(len(caption_image)) if caption_image[c] in rows]
        yield EvalBatch(images[start:rows.stop], torch.tensor(captions).view(-1, 1),
                        caption_image[captions] - start, [str(c) for c in captions], None, [str(r) for r in rows])


def brute_force_retrieval(similarity, caption_image):
    """Ranks by counting: how many wrong candidates score at least as high as the best right one."""
    images, captions = similarity.shape
    i2t, t2i = [], []
    for i in range(images):
        right = [c for c in range(captions) if caption_image[c] == i]
        best = max(similarity[i, c] for c in right)
        i2t.append(sum(1 for c in range(captions) if c not in right and similarity[i, c] >= best))
    for c in range(captions):
        best = similarity[caption_image[c], c]
        t2i.append(sum(1 for i in range(images) if i != caption_image[c] and similarity[i, c] >= best))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out.update({f"{name}_R@{k}": sum(r < k for r in ranks) / len(ranks) for k in (1, 5, 10)})
        out[f"{name}_mean_rank"] = sum(r + 1 for r in ranks) / len(ranks)
    return {**out, "chance_R@1": 1 / images}


def test_retrieval_on_a_hand_made_matrix_with_several_captions_per_image():
    similarity = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.2],
                               [0.8, 0.7, 0.6, 0.1, 0.0],
                               [0.4, 0.95, 0.3, 0.2, 0.5]])
    caption_image = torch.tensor([0, 0, 1, 2, 2])
    metrics = retrieval_metrics(similarity, torch.eye(5), caption_image)
    # i2t: image 0's caption 0 wins; image 1's only caption is 3rd; image 2's caption 4 is 2nd
    # t2i: captions 0, 2, 4 find their image first, caption 3 second, caption 1 third
    assert metrics == pytest.approx({"i2t_R@1": 1 / 3, "i2t_R@5": 1.0, "i2t_R@10": 1.0, "i2t_mean_rank": 2.0,
                                     "t2i_R@1": 3 / 5, "t2i_R@5": 1.0, "t2i_R@10": 1.0, "t2i_mean_rank": 1.6,
                                     "chance_R@1": 1 / 3})
    assert metrics == pytest.approx(brute_force_retrieval(similarity, caption_image))


def test_ties_count_against_the_positive():
    similarity = torch.tensor([[0.5, 0.5, 0.2],
                               [0.1, 0.3, 0.3]])
    caption_image = torch.tensor([0, 1, 1])
    metrics = retrieval_metrics(similarity, torch.eye(3), caption_image)
    # i2t: image 0 ties its caption 0 with a wrong one (caption 1): 2nd; image 1's two captions tie: 1st.
    # t2i: captions 0 and 2 find their image first; caption 1 scores higher with image 0: 2nd.
    assert metrics == pytest.approx({"i2t_R@1": 1 / 2, "i2t_R@5": 1.0, "i2t_R@10": 1.0, "i2t_mean_rank": 1.5,
                                     "t2i_R@1": 2 / 3, "t2i_R@5": 1.0, "t2i_R@10": 1.0, "t2i_mean_rank": 4 / 3,
                                     "chance_R@1": 1 / 2})
    assert metrics == pytest.approx(brute_force_retrieval(similarity, caption_image))


@pytest.mark.parametrize("value", [0.5, float("nan")], ids=["constant", "nan"])
def test_features_that_cannot_tell_candidates_apart_score_no_hits(value):
    images, texts, caption_image = random_split()
    metrics = retrieval_metrics(torch.full_like(images, value), torch.full_like(texts, value), caption_image)
    assert metrics["i2t_R@1"] == metrics["t2i_R@1"] == 0.0 <= metrics["chance_R@1"]
    assert metrics["i2t_mean_rank"] == pytest.approx(len(texts) - len(texts) / len(images) + 1)  # the worst
    logits = torch.full((7, 5), value)
    assert topk_correct(logits, torch.randint(0, 5, (7,)), ks=(1, 4, 5)) == {1: 0, 4: 0, 5: 7}


def random_split(seed=0, images=23, captions=60, dim=6):
    g = torch.Generator().manual_seed(seed)
    caption_image = torch.cat([torch.arange(images), torch.randint(0, images, (captions - images,), generator=g)])
    caption_image = caption_image[torch.randperm(captions, generator=g)].sort().values  # loaders keep image order
    image_features = F.normalize(torch.randn(images, dim, generator=g), dim=1)
    # captions lean towards their image, so recall is neither 0 nor 1
    text_features = F.normalize(image_features[caption_image] + 1.2 * torch.randn(captions, dim, generator=g), dim=1)
    return image_features, text_features, caption_image


def test_retrieval_matches_brute_force_on_random_features():
    images, texts, caption_image = random_split()
    metrics = retrieval_metrics(images, texts, caption_image)
    # random features: no two scores lie within fp32 rounding of each other, so any order of the dot
    # products gives the same integer ranks; metrics are their ratios (approx's default rel 1e-6)
    assert metrics == pytest.approx(brute_force_retrieval(images @ texts.T, caption_image))
    assert 0 < metrics["i2t_R@1"] < metrics["i2t_R@5"] < 1 and 0 < metrics["t2i_R@1"] < 1
    model = FeatureModel(texts)
    assert evaluate_retrieval(model, eval_batches(images, caption_image, 5), CPU, NO_AUTOCAST) == pytest.approx(metrics)


def test_topk_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(40, 9, generator=g), torch.randint(0, 9, (40,), generator=g)
    correct = topk_correct(logits, labels, ks=(1, 3, 5))
    for k in (1, 3, 5):
        assert correct[k] == sum(int(labels[i]) in sorted(range(9), key=lambda c: -logits[i, c])[:k] for i in range(40))
    assert 0 < correct[1] < correct[3] < correct[5] < 40
    assert topk_correct(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([0, 0]), ks=(1, 5)) == {1: 1, 5: 2}


def zeroshot_setup(seed=2, classes=5, images=31):
    g = torch.Generator().manual_seed(seed)
    classnames, templates = [f"class{c}" for c in range(classes)], ["a {}.", "one {} here", "{}!"]
    prompts = [t.format(c) for c in classnames for t in templates]
    tokenizer = PromptTokenizer()
    tokenizer(prompts)
    model = FeatureModel(torch.randn(len(prompts), 4, generator=g))
    labels = torch.randint(0, classes, (images,), generator=g)
    return model, classnames, templates, tokenizer, F.normalize(torch.randn(images, 4, generator=g), dim=1), labels


def brute_force_classifier(model, classnames, templates, tokenizer):
    columns = []
    for c in classnames:
        embeddings = [F.normalize(model.encode_text(tokenizer([t.format(c)]))[0], dim=0) for t in templates]
        columns.append(F.normalize(sum(embeddings) / len(embeddings), dim=0))
    return torch.stack(columns, dim=1)


def test_zeroshot_classifier_and_accuracy():
    model, classnames, templates, tokenizer, images, labels = zeroshot_setup()
    classifier = zeroshot_classifier(model, classnames, templates, tokenizer, CPU, NO_AUTOCAST)
    # unit vectors from a mean of 3 unit vectors in another summation order: a few fp32 roundings
    # (6e-8 each) of values <= 1, so within 1e-6; the norms within allclose's default 1e-5
    assert torch.allclose(classifier, brute_force_classifier(model, classnames, templates, tokenizer), atol=1e-6)
    assert torch.allclose(classifier.norm(dim=0), torch.ones(5))
    batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 31, 8)]
    metrics = evaluate_zeroshot(model, classifier, batches, CPU, NO_AUTOCAST)
    correct = topk_correct(images @ classifier, labels)
    assert metrics == pytest.approx({"top1": correct[1] / 31, "top5": correct[5] / 31, "images": 31})
    assert 0 < metrics["top1"] < 1 and metrics["top5"] == 1.0  # 5 classes


def _evaluate_on_my_share():
    rank, size, group = distributed.dp_rank(), distributed.dp_size(), distributed.dp_group()
    images, texts, caption_image = random_split()
    half = len(images) // 2 + 1  # uneven shares
    mine = slice(0, half) if rank == 0 else slice(half, None)
    own = (caption_image >= (mine.start or 0)) & (caption_image < (mine.stop or len(images)))
    model = FeatureModel(texts)
    # every caption keeps its global id, so text features index the same table on both ranks
    batches = [EvalBatch(b.images, b.tokens + (own.nonzero()[0, 0] if rank else 0), b.caption_image, b.captions,
                         None, b.keys) for b in eval_batches(images[mine], caption_image[own] - (mine.start or 0), 4)]
    retrieval = evaluate_retrieval(model, batches, CPU, NO_AUTOCAST, group)
    zmodel, classnames, templates, tokenizer, zimages, labels = zeroshot_setup()
    classifier = zeroshot_classifier(zmodel, classnames, templates, tokenizer, CPU, NO_AUTOCAST, group)
    zeroshot = evaluate_zeroshot(zmodel, classifier, [(zimages[rank::size], labels[rank::size])], CPU, NO_AUTOCAST, group)
    return retrieval, classifier, zeroshot


def test_two_data_parallel_ranks_get_the_single_process_results():
    images, texts, caption_image = random_split()
    single = retrieval_metrics(images, texts, caption_image)
    model, classnames, templates, tokenizer, zimages, labels = zeroshot_setup()
    classifier = zeroshot_classifier(model, classnames, templates, tokenizer, CPU, NO_AUTOCAST)
    zeroshot = evaluate_zeroshot(model, classifier, [(zimages, labels)], CPU, NO_AUTOCAST)
    for retrieval, rank_classifier, rank_zeroshot in run_distributed(_evaluate_on_my_share, 2):
        assert retrieval == pytest.approx(single)
        assert torch.allclose(rank_classifier, classifier, atol=1e-6)
        assert rank_zeroshot == pytest.approx(zeroshot)


def test_class_and_template_files(tmp_path):
    (tmp_path / "plain.txt").write_text("# animals\ncat\n\ngolden retriever\n")
    (tmp_path / "indexed.txt").write_text("1\tdog\n0\tcat\n2\tsea lion\n")
    (tmp_path / "gappy.txt").write_text("0\tcat\n2\tdog\n")
    assert read_class_names(tmp_path / "plain.txt") == ["cat", "golden retriever"]
    assert read_class_names(tmp_path / "indexed.txt") == ["cat", "dog", "sea lion"]
    with pytest.raises(ValueError, match="indices must be 0..1"):
        read_class_names(tmp_path / "gappy.txt")
    templates = read_templates()
    assert templates[0] == "a photo of a {}." and len(templates) == 8 and "itap of a {}." in templates
    assert read_templates(OPENAI_TEMPLATES) == templates
    (tmp_path / "bad.txt").write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_templates(tmp_path / "bad.txt")


def test_synthetic_task_labels_from_captions():
    shape, colour = synthetic_task("shape"), synthetic_task("colour")
    assert (len(shape.classnames), len(shape.templates), len(colour.classnames), len(colour.templates)) == (6, 72, 8, 54)
    assert shape.templates[0].format("circle") == "a red circle at the top left"
    batch = EvalBatch(torch.zeros(2, 3, 4, 4), torch.zeros(3, 1, dtype=torch.long), torch.tensor([0, 0, 1]),
                      ["a cyan ring in the center", "ignored", "a blue square on the left"], None, ["a", "b"])
    [(images, labels, keys)] = list(shape.batches([batch]))
    assert labels.tolist() == [5, 1] and images is batch.images and keys == ["a", "b"]
    assert next(colour.batches([batch]))[1].tolist() == [7, 2]
    with pytest.raises(ValueError, match="choose shape or colour"):
        synthetic_task("size")


def test_image_folder_batches(tmp_path):
    for name, count in (("zebra", 3), ("ant", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            noise_image(i).save(tmp_path / name / f"{i}.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    transform = lambda image: torch.tensor(image.size)
    batches = list(image_folder_batches(tmp_path, transform, batch_size=4))
    assert [labels.tolist() for _, labels, _ in batches] == [[0, 0, 1, 1], [1]]  # ant < zebra
    assert list(batches[1][2]) == [f"zebra{os.sep}2.png"]  # the key: the path under the folder
    assert batches[0][0].tolist() == [[24, 24]] * 4
    shares = [image_folder_batches(tmp_path, transform, batch_size=8, dp_rank=r, dp_size=2) for r in range(2)]
    assert [next(iter(s))[1].tolist() for s in shares] == [[0, 1, 1], [0, 1]]
    assert shares[0].dataset.classes == ["ant", "zebra"]
