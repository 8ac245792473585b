"""A model loaded from a GGUF file leaves OUT/merged.gguf: it loads with transformers' GGUF loader and computes the
merged model's logits quantized in the input file's types; metadata and tokenizer are copied; the export is
atomic, resumes after an interruption, and never replaces a file this tool did not write."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastunlearn import gguf_io
from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import UnlearnConfig, unlearn
from fastunlearn.engine.outdir import OutDirError
from fastunlearn.models import load_model
from fastunlearn.ops import quant
from tests.helpers.tiny_gguf import TOKENS, tiny_llama, write_template

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")
SEQ = 12


def as_set(ids: torch.Tensor) -> SequenceSet:
    return SequenceSet(ids, torch.ones_like(ids), torch.arange(len(ids)))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_template(tiny_llama(), path)
    return path


@pytest.fixture(scope="module")
def loaded(template, one_thread):
    return load_model(template, device="cpu")


def data() -> UnlearningData:
    ids = torch.randint(0, len(TOKENS), (16, SEQ), generator=torch.Generator().manual_seed(3))
    return UnlearningData(as_set(ids[:4]), as_set(ids[4:12]), as_set(ids[12:]))


def config(template, **overrides) -> UnlearnConfig:
    options = {"params": "lora", "rank": 4, "alpha": 8.0, "lr": 1e-2, "stop": "epochs", "max_epochs": 2,
               "micro_batch_size": 4, "el_n": 3, "gguf_template": str(template)}  # fmt: skip
    return UnlearnConfig(**{**options, **overrides})


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def kv_bytes(path) -> dict[str, bytes]:
    reader = gguf.GGUFReader(str(path))
    return {k: b"".join(p.tobytes() for p in f.parts) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def finished(template, loaded, tmp_path_factory):
    model, tokenizer = loaded
    out = tmp_path_factory.mktemp("run") / "out"
    return unlearn(copy.deepcopy(model), data(), config(template), out, tokenizer=tokenizer)


@pytest.mark.parametrize("params", ["lora", "full"])
def test_merged_gguf_is_the_merged_model_quantized_in_the_input_files_types(params, template, loaded, finished,
                                                                            tmp_path):  # fmt: skip
    model, tokenizer = loaded
    result = finished if params == "lora" else unlearn(copy.deepcopy(model), data(), config(template, params=params,
                                                       lr=1e-3), tmp_path / "full", tokenizer=tokenizer)  # fmt: skip
    out = result.out_dir
    assert result.log["outputs"]["gguf"] == "merged.gguf" and gguf_io.is_own_gguf(out / "merged.gguf")
    reloaded, reloaded_tokenizer = load_model(out / "merged.gguf", device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = data().forget.input_ids
    with quant.roundtrip_model(merged, gguf_io.formats_like(merged, template), progress=False):
        expected = logits(merged, ids)
    assert torch.equal(logits(reloaded, ids), expected)
    assert not torch.allclose(logits(model, ids), expected, atol=1e-3)  # unlearning changed it: the test can fail
    text = "hello world"
    assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    before, after = kv_bytes(template), kv_bytes(out / "merged.gguf")
    assert after.pop(gguf_io.MARKER_KEY) and after == before


def test_write_gguf_false_writes_none_and_a_template_that_does_not_fit_is_refused_before_anything(
    template, loaded, tmp_path
):
    model, _ = loaded
    result = unlearn(copy.deepcopy(model), data(), config(template, write_gguf=False, max_epochs=1), tmp_path / "a")
    assert "gguf" not in result.log["outputs"] and not (tmp_path / "a" / "merged.gguf").exists()
    other = tiny_llama()
    other.config.num_hidden_layers = 1
    del other.model.layers[1]
    with pytest.raises(ValueError, match=r"the model has no weight for template tensor 'blk.1.attn_q.weight'"):
        unlearn(other, data(), config(template), tmp_path / "b")
    assert not (tmp_path / "b").exists()  # refused before OUT was claimed


class Interrupt(BaseException):
    pass


def test_an_interrupted_export_resumes_and_a_users_merged_gguf_is_never_replaced(template, loaded, finished,
                                                                                 tmp_path, monkeypatch):  # fmt: skip
    model, tokenizer = loaded
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(quant, "quantize_blocks", interrupted)  # inside write_gguf_like, after merged/
        with pytest.raises(Interrupt):
            unlearn(copy.deepcopy(model), data(), config(template), out, tokenizer=tokenizer)
    assert not (out / "merged.gguf").exists() and (out / ".fastunlearn").is_dir()
    assert {p.name for p in out.iterdir()} <= {".fastunlearn", "log.json", "merged", "adapter"}  # no temporary
    (out / "merged.gguf").write_bytes(template.read_bytes())  # a file of the user's under that name
    with pytest.raises(OutDirError, match="holds a merged.gguf that this tool did not write"):
        unlearn(copy.deepcopy(model), data(), config(template), out, tokenizer=tokenizer)
    assert (out / "merged.gguf").read_bytes() == template.read_bytes()
    (out / "merged.gguf").unlink()
    resumed = unlearn(copy.deepcopy(model), data(), config(template), out, tokenizer=tokenizer)
    assert resumed.log["resumes"] == 1  # the refused call changed nothing
    assert (out / "merged.gguf").read_bytes() == (finished.out_dir / "merged.gguf").read_bytes()
