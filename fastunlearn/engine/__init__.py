"""The unlearning engine (its entry point is ``fastunlearn.unlearn``): set up the trained parameters, then
one optimizer update per epoch until the forget set looks like
data the model never saw (Cha et al., arXiv 2408.06621; protocol of Jang et al. 2023).

- **Parameters**: ``"full"`` (every weight), ``"lora"`` (LoRA adapters, A Kaiming / B zero) or ``"fila"``
  (adapters initialized from the forget set's Fisher information relative to the retain set's).
- **Epoch** = ONE AdamW update from the gradient of the whole forget set, accumulated over micro-batches. Each
  forget micro-batch is paired with a retain micro-batch (the retain set reshuffled every epoch and cycled)
  when ``retain_weight > 0``. Every term is a sum over next-token targets divided by the epoch's total target
  count, so the accumulated gradient is that of mean forget term + retain_weight x mean retain loss over the
  epoch's tokens, whatever the micro-batch size. NPO and SimNPO (``forget_loss``) are per-sequence terms: a sum
  over forget sequences divided by the epoch's sequence count. NPO's reference log-likelihoods are computed
  once, on the model as given, before the trained parameters are set up (``engine.reference``), and kept in the
  checkpoint: no reference model is held.
- **Stop**: after each epoch the forget set's MA is measured; its EL_n only once MA meets its limit (EL is
  expensive; ``None`` otherwise). ``stop="heldout"`` (the paper): MA and EL_n at or below the held-out set's
  values measured before unlearning; ``stop="threshold"``: at or below ``ma_threshold`` and ``el_threshold``.
  The run stops at the first epoch >= ``min_epochs`` that meets it; reaching ``max_epochs`` without it, or a
  non-finite loss or gradient (then no update is made), is a failure, and is recorded as one.
  ``stop="epochs"`` (TOFU's protocol) has no criterion: exactly ``max_epochs`` epochs, no held-out set needed,
  the forget MA every epoch, never EL_n (the costliest metric; no criterion needs it); a non-finite update is
  still a failure.
- **Hooks**: ``evaluate_each_epoch(model, epoch) -> {name: float}`` (e.g. TOFU's forget quality and model
  utility) runs before unlearning (epoch 0) and after every epoch; its values go into ``log.json`` under
  ``"on_epoch"`` and into the report and plot (``on_epoch=`` is its deprecated former name).
  ``on_epoch_end(task_index, epoch_record)`` is a callback after each epoch's checkpoint, as in ``finetune``.
- **Continual**: forget sets unlearned one after another on the same model (adapters continue; a new optimizer
  per task; FILA is initialized once, from the first task). After each task every forget set so far, the
  held-out set and (if asked) the retain perplexity are measured again. The run succeeds when every task met
  the criterion and every forget set still meets it after the last task.
- **What is measured when**: every epoch the forget MA (EL_n once MA meets its limit), which is all the stop rule
  needs; the retain perplexity (``eval_retain_ppl``) and the utility sets' perplexities before unlearning,
  after each task and, with ``eval_every=K``, after every K-th epoch (``None`` in the epoch records otherwise).
  Every value comes from one teacher-forced pass per batch (``evals.metrics.score_sequences``: log p(y) and the
  greedy token from the last hidden states, no (B, T, V) logits); the perplexity sets are scored together.
- **Evaluation cost** is bounded: the retain perplexity is measured on one seeded sample
  of ``eval_retain_max`` (128) retain sequences, the same every time it is measured (its own generator,
  seeded with ``seed``: training is unchanged by it); FILA's retain Fisher uses a seeded sample of
  ``fisher_max_examples`` (32; the forget set whole); None: every sequence. The held-out set's MA and EL_n
  before unlearning are cached across runs (``cache_heldout_baseline``; ``engine.cache``: keyed by the model
  as given, the held-out set, el_n, dtype and device type) and, after a task, its EL is measured only with
  ``eval_heldout_el_after`` (its MA always). ``log["data"]`` records the sample sizes, ``log["baseline_cache"]``
  whether the held-out values came from the cache. Long phases log progress lines (elapsed time, ETA) on the
  ``fastunlearn.engine`` logger, rank 0 only (``engine.progress``; the CLI shows them).

Outputs in ``out_dir``, each written atomically (a reader never sees a partial file): ``log.json`` after
every epoch, then ``report.md``, ``metrics.png``, ``adapter/`` (PEFT, for lora/fila) and ``merged/`` (a
transformers model; with the tokenizer if given). Everything else lives in the run's own folder
``out_dir/.fastunlearn/`` (``outdir``): a marker, a lock held for the whole run (a second run on the same
``out_dir`` fails at once), the write temporaries, and the checkpoint (``checkpoint``): a new version after
the setup and after every epoch (trainable tensors, AdamW state and RNG states in safetensors, the log in
JSON, a manifest with each file's sha256 and the model's fingerprint; no pickle), made current by an
atomically replaced pointer, so a kill at any instant leaves a complete one. ``out_dir`` must be missing,
empty or a run's; a run deletes nothing outside ``.fastunlearn/``. Called again with the same arguments on an
unmodified copy of the model, an interrupted run continues from its last finished epoch and ends as an
uninterrupted one would (bit-equal on CPU; on CUDA up to nondeterministic kernels); a corrupt checkpoint,
another model, config or data is a one-line error. The checkpoint is removed when the run finishes (the
marker and the lock file stay).

**Multi-process** (a ``torch.distributed`` process group is initialized, e.g. under ``torchrun``; every rank
calls ``unlearn`` with the same arguments and its own copy of the model on its own device): FILA's Fisher
and low-rank steps are shared out and reduced (``fastunlearn.utils.distributed``); ``parallel="ddp"`` wraps the
model in ``DistributedDataParallel``, ``"fsdp"`` shards it with FSDP2 ``fully_shard`` (per transformer
block), after the setup (adapters, FILA) and before the first evaluation; a model given on the CPU is moved
to the rank's GPU block by block as it is sharded. Each epoch's micro-batch pairs (the same list in every
rank, as one process draws it) go round robin to the ranks, so an update is the one a single process would
make (up to float rounding). Forget, held-out and retain metrics are sharded by sequence and gathered
(under FSDP, whose forwards need every rank, in lockstep: ``_parallel.lockstep``). Rank 0 alone writes
files, with the full (gathered) state; a checkpoint resumes under any world size that leaves each rank a
micro-batch. Resume restores rank 0's random state on every rank: bit-equal resumption holds for one
process, or without dropout.
"""

from fastunlearn.engine.config import DEFAULT_LR, DTYPES, PARAMS, STOPS, UnlearnConfig, UnlearnResult
from fastunlearn.engine.recipe import UnlearnRecipe, unlearn

__all__ = ["DEFAULT_LR", "DTYPES", "PARAMS", "STOPS", "UnlearnConfig", "UnlearnRecipe", "UnlearnResult", "unlearn"]
