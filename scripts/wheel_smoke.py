"""A built wheel, installed into a clean venv, used the way a user uses it: run from outside the checkout.

    python scripts/wheel_smoke.py CHECKOUT WORKDIR

Checks, each failing with a message that says what is missing:
1. every package of the checkout (each folder of ``fastunlearn/`` with an ``__init__.py``, and ``kernels/`` as
   ``fastunlearn.kernels``) is installed, not imported from the checkout, and imports;
2. ``fastunlearn info`` runs;
3. ``fastunlearn eval --tofu`` on a tiny model and a tiny folder in TOFU's layout;
4. a short ``fastunlearn unlearn`` on a tiny model (2 epochs, ``--stop epochs``).
Nothing here imports the checkout's tests: the tiny model and data are made below.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

WORDS = [f"w{i}" for i in range(40)]


def checkout_packages(checkout: Path) -> set[str]:
    found = {"fastunlearn.kernels"}
    for init in (checkout / "fastunlearn").rglob("__init__.py"):
        found.add(".".join(("fastunlearn", *init.parent.relative_to(checkout / "fastunlearn").parts)).rstrip("."))
    return found


def check_packages(checkout: Path) -> None:
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    missing = []
    for name in sorted(checkout_packages(checkout)):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing.append(f"{name} ({exc})")
            continue
        where = Path(module.__file__).resolve()
        if site not in where.parents and Path(sysconfig.get_paths()["platlib"]).resolve() not in where.parents:
            missing.append(f"{name} imported from {where}, not from the installed wheel")
    if missing:
        sys.exit("the wheel lacks packages of the checkout:\n  " + "\n  ".join(missing))
    print(f"all {len(checkout_packages(checkout))} packages of the checkout import from the wheel")


def tiny_model(path: Path, seed: int) -> None:
    """A 2-layer GPT-Neo over a word-level tokenizer of WORDS, saved with its tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", "Question", "Answer", ":", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="[EOS]")  # fmt: skip
    torch.manual_seed(seed)
    config = GPTNeoConfig(
        vocab_size=64, max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global"], 2]], window_size=64, intermediate_size=64, embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, bos_token_id=2, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    GPTNeoForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def tofu_folder(path: Path) -> None:
    """TOFU's four evaluation files (JSON lists; the real-author and world-fact files as JSON lines)."""
    rng = random.Random(0)
    say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    path.mkdir()
    for name, paraphrased in (("forget01", True), ("retain_perturbed", True), ("real_authors_perturbed", False),
                              ("world_facts_perturbed", False)):  # fmt: skip
        rows = [{"question": say(4), "answer": say(3), "perturbed_answer": [say(3) for _ in range(3)],
                 **({"paraphrased_answer": say(3)} if paraphrased else {})} for _ in range(4)]  # fmt: skip
        text = json.dumps(rows) if paraphrased else "\n".join(json.dumps(r) for r in rows) + "\n"
        (path / f"{name}.json").write_text(text)


def cli(*argv: str, ok: tuple[int, ...] = (0,)) -> None:
    exe = shutil.which("fastunlearn", path=os.path.dirname(sys.executable))
    if exe is None:
        sys.exit(f"the wheel installed no fastunlearn command next to {sys.executable}")
    run = subprocess.run([exe, *argv], capture_output=True, text=True)
    if run.returncode not in ok:
        sys.exit(f"fastunlearn {argv[0]} exited {run.returncode}:\n{run.stdout}\n{run.stderr}")
    print(f"fastunlearn {' '.join(argv[:1])}: exit {run.returncode}")


def main() -> None:
    checkout, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    if Path.cwd().resolve() == checkout or checkout in Path.cwd().resolve().parents:
        sys.exit("run this from outside the checkout")
    check_packages(checkout)
    cli("info")
    tiny_model(work / "model", 0)
    tiny_model(work / "retain", 1)
    tofu_folder(work / "tofu")
    cli("eval", "--model", str(work / "model"), "--tofu", str(work / "tofu"), "--retain-model", str(work / "retain"),
        "--tofu-batch-size", "2", "--json", str(work / "tofu.json"))  # fmt: skip
    rng = random.Random(1)
    for name, n in (("forget", 4), ("retain", 8), ("heldout", 4)):
        (work / f"{name}.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)))
    cli("unlearn", "--model", str(work / "model"), "--forget", str(work / "forget.txt"), "--retain",
        str(work / "retain.txt"), "--seq-len", "12", "--rank", "2", "--stop", "epochs", "--max-epochs", "2",
        "--out", str(work / "run"))  # fmt: skip
    for output in ("log.json", "report.md", "adapter/adapter_config.json", "merged/config.json"):
        if not (work / "run" / output).is_file():
            sys.exit(f"fastunlearn unlearn left no {output}")
    print("wheel smoke check passed")


if __name__ == "__main__":
    main()
