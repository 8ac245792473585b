"""MA, memorization accuracy (see ``fastunlearn.evals.metrics``): one teacher-forced forward per batch
(``scoring.score_sequences``)."""

from __future__ import annotations

from torch import Tensor, nn

from fastunlearn.evals.metrics.scoring import next_targets, score_sequences


def memorization_accuracy(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    batch_size: int = 32,
    fused: bool | None = None,
) -> Tensor:
    """MA of each sequence (N,) float64: the fraction of predicted positions t (x_t and x_{t-1} not padding)
    where argmax p(. | x_<t) == x_t. One teacher-forced forward per ``batch_size`` sequences; padding may be
    on either side (the position ids follow ``attention_mask``).

    ``labels`` (N, T) aligned with input_ids (Hugging Face style, -100 where nothing is scored) or None: only
    positions with a label count, and the greedy token is compared with the label. For a question/answer set
    (``fastunlearn.data.qa``) that is MA over the answer, each answer token predicted from the prompt and the answer
    before it (teacher forcing). ``fused``: how the greedy tokens are found (:func:`score_sequences`: None, from the
    last hidden states without the logits where the model allows it)."""
    scored = next_targets(model, input_ids, attention_mask, labels)
    empty = ((scored.targets != -100).sum(1) == 0).nonzero().flatten()
    if len(empty):
        if labels is not None:
            raise ValueError(f"sequence {int(empty[0])} has no labelled next-token target: MA is undefined")
        raise ValueError(f"attention_mask leaves sequence {int(empty[0])} with fewer than 2 tokens: MA is undefined")
    scores = score_sequences(model, scored, batch_size=batch_size, fused=fused, desc="MA")
    return scores.correct.double() / scores.tokens
