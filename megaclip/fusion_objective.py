"""The fusion objective (ALBEF, UForm): the contrastive loss of the two towers, plus image-text
matching (ITM) on hard negatives and causal captioning, both through the fusion layers.

- ITM: every image is paired with its caption and with one hard-negative caption, every caption with
  one hard-negative image, drawn from the whole global batch with probability proportional to the
  softmax of the contrastive logits, never the positive (nor a sample with the very same caption,
  which would be a positive under another name). Each rank draws for its own rows (its rows of the
  logits against the DP-gathered features: local-by-global, as CLIP's local loss) by the inverse CDF
  at uniforms drawn for the whole global batch as the regularisers draw (the optimizer step's
  generator, or torch's global one; either is seeded and consumed alike on every rank): every TP rank
  draws the same negatives without communicating, a resumed run draws the same, and any TP/DP layout
  draws what one process draws. With model.loss_block_size the rows are drawn that many at a time, so
  no more than block × global batch similarities exist at once (under accumulation the rows are the
  rank's whole batch).
  The drawn rows reach the rank that scores them by one all_to_all (megaclip.exchange). The loss is
  the cross-entropy over (positives, image-side negatives, text-side negatives).
- Captioning: the text tower is causal already, so a second pass through the few fusion layers with a
  causal mask predicts each caption's next token from the image and the caption so far. Masked
  language modelling would need a second text-tower pass on masked captions. The logits stay split
  over the vocabulary across TP ranks (megatron-core's vocab-parallel cross-entropy, which runs on
  gloo: it only all-reduces).

Per DP rank both terms are means over its own pairs / tokens scaled so that the DP mean of the ranks'
losses is the global mean; with the DP gradient average that gives exactly the global gradient
(negatives scored on another rank send their gradient home through the all_to_all's backward).
Under accumulation both terms run through the fusion layers a micro-batch of rows at a time, each
chunk checkpointed (``_over_rows``), so the loss pass's memory is one chunk's, not the rank's batch's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# megaclip's modules first: megaclip.distributed imports megatron-core with a clear message when triton is missing
from megaclip.exchange import fetch_rows
from megaclip.losses import gather_features
from megaclip.model.fusion import caption_logits
from megaclip.model.regularisers import rows_of_global_batch
from megaclip.objectives import Objective
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def draw_negatives(logits: torch.Tensor, own: torch.Tensor, caption_id: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One candidate per row of ``logits`` [rows, N], drawn with probability ∝ softmax over the
    candidates whose caption differs from the row's own sample's (``own``: each row's index among the N;
    ``caption_id``: equal for equal captions), or over all the others when every one shares it. By the
    inverse CDF at ``uniforms`` [rows] in [0, 1): a row's draw depends on its own number only, so any
    split of the rows over ranks draws what one process draws. Excluded candidates have zero
    probability and so a flat CDF, which the search never stops on."""
    same = caption_id[own].unsqueeze(1) == caption_id.unsqueeze(0)
    itself = own.unsqueeze(1) == torch.arange(len(caption_id), device=own.device).unsqueeze(0)
    excluded = torch.where(same.all(dim=1, keepdim=True), itself, same)
    cdf = logits.float().masked_fill(excluded, float("-inf")).softmax(dim=1).cumsum(dim=1)
    drawn = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return drawn.clamp(max=len(caption_id) - 1)  # u * total rounding up to the total


def sample_hard_negatives(image_logits, text_logits, own, caption_id, uniforms, block: int = 0):
    """(a caption for each of this rank's images, an image for each of its captions), global indices:
    ``image_logits(rows)`` [rows, N] gives the ``rows`` (a slice) of this rank's images against every
    caption, ``text_logits(rows)`` of its captions against every image; ``uniforms`` [2, rows]. Drawn
    ``block`` rows at a time (0: all at once), so one block's logits and temporaries exist at a time.
    The blocks draw what all rows at once draw: a row's draw depends on its own logits and uniform only
    (draw_negatives), and its logits are its own row of q @ kᵀ, the same product of the same values in
    any block (a BLAS that rounded a row differently for another row count could change a draw only
    when its uniform fell within that rounding of a step of the CDF: 1e-5 of the draws or fewer)."""
    step = block or len(own)
    blocks = [slice(r, min(r + step, len(own))) for r in range(0, len(own), step)]

    def draw(logits, u):
        return torch.cat([draw_negatives(logits(rows), own[rows], caption_id, u[rows]) for rows in blocks])

    return draw(image_logits, uniforms[0]), draw(text_logits, uniforms[1])


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``targets`` under logits split over the vocabulary."""
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        return vocab_parallel_cross_entropy(logits.float(), targets)
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


class FusionObjective(Objective):
    """``contrastive``: the towers' objective (CLIP's or SigLIP's); model.fusion weighs the other terms.
    ``sample_negatives`` is an attribute so that tests can fix the draw."""

    def __init__(self, model_cfg, dp_group, contrastive: Objective):
        self.contrastive = contrastive
        self.dp_group = dp_group
        self.itm_weight = model_cfg.fusion.itm_weight
        self.lm_weight = model_cfg.fusion.lm_weight
        self.vocab_size = model_cfg.text.vocab_size
        self.block_size = model_cfg.get("loss_block_size", 0)  # get: configs saved before the key
        self.chunk = model_cfg.get("micro_batch_size") or 0  # the fusion terms' rows at a time; 0: all at once
        self.sample_negatives = sample_hard_negatives

    def features(self, model, images, tokens):
        image_features, image_tokens = model.visual.forward_with_tokens(images)
        text_features, text_states = model.text.forward_with_states(tokens)
        return F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), image_tokens, text_states, tokens

    def loss(self, model, features):
        image_features, text_features, image_tokens, text_states, tokens = features
        total, terms = self.contrastive.loss(model, (image_features, text_features))
        if self.itm_weight:
            terms["itm"] = self.matching_loss(model, image_features, text_features, image_tokens, text_states, tokens)
            total = total + self.itm_weight * terms["itm"]
        if self.lm_weight:
            terms["lm"] = self.captioning_loss(model, image_tokens, text_states, tokens)
            total = total + self.lm_weight * terms["lm"]
        return total, terms

    def _dp(self):
        if self.dp_group is None or not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self.dp_group), dist.get_world_size(self.dp_group)

    def matching_loss(self, model, image_features, text_features, image_tokens, text_states, tokens):
        rank, size = self._dp()
        batch = len(tokens)
        gather = (lambda x: gather_features(x.detach(), self.dp_group, with_grad=False)) if size > 1 else torch.Tensor.detach
        with torch.no_grad():
            all_tokens = gather(tokens)
            _, caption_id = torch.unique(all_tokens, dim=0, return_inverse=True)
            scale = model.logit_scale.exp().float()
            image_features, text_features = image_features.float(), text_features.float()
            own = torch.arange(rank * batch, (rank + 1) * batch, device=tokens.device)
            uniforms = rows_of_global_batch(lambda rows, g: torch.rand(rows, 2, generator=g, device=tokens.device),
                                            batch, tokens.device).T
            all_image, all_text = gather(image_features), gather(text_features)
            text_for_image, image_for_text = self.sample_negatives(
                lambda rows: scale * image_features[rows] @ all_text.T,
                lambda rows: scale * text_features[rows] @ all_image.T, own, caption_id, uniforms, self.block_size)
        # every rank's draws, both sides in one gather, on the host once: the exchanges' plans need them there
        drawn = gather(torch.stack([text_for_image, image_for_text], dim=1)).view(size, batch, 2)
        drawn = drawn.cpu() if size > 1 else drawn
        negative_states = fetch_rows(text_states, drawn[..., 0], self.dp_group)
        negative_images = fetch_rows(image_tokens, drawn[..., 1], self.dp_group)
        match = self._over_rows(model.fusion.match_logits, [(image_tokens, text_states, tokens),
                                                             (image_tokens, negative_states, all_tokens[text_for_image]),
                                                             (negative_images, text_states, tokens)])
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(match.device)
        return F.cross_entropy(match.float(), labels)

    def captioning_loss(self, model, image_tokens, text_states, tokens):
        """Next-token cross-entropy over the caption tokens up to its end-of-text token, through the
        fusion layers under a causal mask; the mean over the global batch's tokens (see the module)."""
        rank, size = self._dp()
        end = (tokens == model.fusion.eot_id).int().argmax(dim=1, keepdim=True)
        counted = torch.arange(tokens.shape[1] - 1, device=tokens.device).unsqueeze(0) < end  # targets up to end

        def caption_nll(image_tokens, text_states, tokens, counted):  # each caption's summed next-token NLL
            fused = model.fusion(image_tokens, text_states, causal=True)
            logits = caption_logits(fused[:, :-1], model.text.token_embedding.weight, self.vocab_size)
            return torch.where(counted, token_nll(logits, tokens[:, 1:]), 0.0).sum(dim=1)

        nll = self._over_rows(caption_nll, [(image_tokens, text_states, tokens, counted)])
        count = counted.sum().float()
        if size > 1:
            dist.all_reduce(count, group=self.dp_group)
        return nll.sum() * size / count.clamp(min=1)

    def _over_rows(self, fn, groups):
        """``fn`` over the rows of every group of row-aligned tensors, results concatenated in order. All
        rows at once without micro-batches; under accumulation (whose loss pass sees the rank's whole
        batch) a micro-batch of rows at a time, each chunk checkpointed, so that only one chunk's
        fusion activations and captioning logits exist at once: recomputed in its backward (dropout
        replayed), as the towers' micro-batches are. The checkpoints keep only the chunks' inputs,
        slices of tensors the loss holds anyway."""
        if not self.chunk or all(len(group[0]) <= self.chunk for group in groups):
            return fn(*(torch.cat(column) if len(groups) > 1 else column[0] for column in zip(*groups)))
        return torch.cat([checkpoint(fn, *(t[start:start + self.chunk] for t in group), use_reentrant=False,
                                     preserve_rng_state=True)
                          for group in groups for start in range(0, len(group[0]), self.chunk)])
