"""``fastunlearn.utils.validate.check_token_ids``: the one token-id check of the metrics, FILA, the unlearning
engine and fine-tuning (argument order name, ids, model like every check of ``validate``)."""

from __future__ import annotations

import pytest
import torch

from fastunlearn.utils.validate import check_token_ids, token_id_limit
from tests.helpers.tiny_models import VOCAB, tiny_model


class ConfigOnly(torch.nn.Module):
    """A model that says its vocabulary only through ``config.vocab_size``."""

    class config:  # noqa: N801 - the attribute Hugging Face models have
        vocab_size = 10


def test_ids_in_range_come_back_as_int64_on_the_cpu():
    ids = torch.tensor([[0, VOCAB - 1]], dtype=torch.int32)
    out = check_token_ids("input_ids", ids, tiny_model("gpt_neo"))
    assert out.dtype == torch.int64 and out.device.type == "cpu" and out.tolist() == [[0, VOCAB - 1]]


@pytest.mark.parametrize("bad, shown", [(VOCAB, VOCAB), (-1, -1)])
def test_an_id_out_of_range_is_named_with_the_embedding_rows(bad, shown):
    ids = torch.tensor([[3, bad, 5]])
    with pytest.raises(ValueError) as exc:
        check_token_ids("forget set", ids, tiny_model("gpt_neo"))
    message = str(exc.value)
    assert message.startswith(f"forget set has token id {shown}, outside [0, {VOCAB}) (min {min(bad, 3)}, max ")
    assert f"input embeddings have {VOCAB} rows (its vocabulary)" in message and "\n" not in message


def test_the_limit_falls_back_to_the_configs_vocab_size_and_else_is_not_checked():
    assert token_id_limit(tiny_model("gpt2"))[0] == VOCAB
    assert token_id_limit(ConfigOnly()) == (10, "the model's vocabulary (config.vocab_size) has 10 ids")
    with pytest.raises(ValueError, match=r"ids has token id 10, outside \[0, 10\) .*vocab_size\) has 10 ids"):
        check_token_ids("ids", torch.tensor([10]), ConfigOnly())
    assert token_id_limit(torch.nn.Linear(2, 2)) is None
    assert check_token_ids("ids", torch.tensor([10**6]), torch.nn.Linear(2, 2)).tolist() == [10**6]


@pytest.mark.parametrize(
    "ids, error, match",
    [
        ([1, 2], TypeError, "ids must be a torch.Tensor of token ids, got list"),
        (torch.ones(2), TypeError, "ids must hold integer token ids, got dtype torch.float32"),
        (torch.ones(2, dtype=torch.bool), TypeError, "ids must hold integer token ids, got dtype torch.bool"),
        (torch.zeros(0, 3, dtype=torch.long), ValueError, r"ids is empty \(shape \(0, 3\)\)"),
    ],
)
def test_wrong_types_and_empty_tensors_are_named(ids, error, match):
    with pytest.raises(error, match=match):
        check_token_ids("ids", ids, tiny_model("gpt_neo"))


def test_fine_tuning_names_an_out_of_vocabulary_id(tmp_path):
    from fastunlearn.data.text import SequenceSet
    from fastunlearn.engine.finetune import FinetuneConfig, finetune

    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    ids[1, 2] = VOCAB + 3
    data = SequenceSet(ids, torch.ones_like(ids), torch.arange(2))
    with pytest.raises(ValueError, match=rf"data has token id {VOCAB + 3}, outside \[0, {VOCAB}\)"):
        finetune(tiny_model("gpt_neo"), data, FinetuneConfig(), tmp_path / "run")
    assert not (tmp_path / "run").exists()
