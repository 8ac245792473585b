"""Does the forgetting hold? An audit of an unlearned model against what happens to it after unlearning.

The engine stops when the forget set's EL_n and MA fall to the held-out set's level, in float, on the model as
trained. Users deploy something else: a quantized file, or a model that may be fine-tuned again. Three probes,
each with a one-line verdict (``AuditResult.verdicts``); the audit passes when every probe passes:

- **quantization** (``quantization``): every weight round-tripped through each format of ``formats`` (default q8_0,
  q4_0, q4_1, q5_0, nf4; q5_1, and q4_k, q6_k on request: their scale search costs 5x a 32-weight format), and through
  the types of a GGUF file (``gguf=``). FAILED where the forget set's MA or EL_n on Q(model) is above the held-out
  set's on Q(reference) (on Q(model) without a reference).
- **relearning** (``relearning``): ``relearn_steps`` = 10 AdamW steps (lr ``relearn_lr`` = 1e-4) on
  ``relearn_rows`` = 2 forget rows, the other forget rows scored; a control on held-out rows and a benign
  fine-tune on retain rows. FAILED where the scored forget rows come back above max(criterion, the held-out rows
  after the same steps). Reports the fraction of what unlearning removed that comes back.
- **membership** (``membership``): loss, zlib, Min-K% and Min-K%++ scores per sequence, the AUC of forget vs
  held-out and MUSE's PrivLeak. FAILED where an AUC is further from the retrain model's (or the ideal 0.5) than
  ``membership_z`` null standard deviations.

The criterion throughout is the engine's: forget MA <= limit and forget EL_n <= limit, the limits being the
held-out set's values on the reference (the model before unlearning) when one is given, else on the audited model.

    from fastunlearn import audit
    result = audit(model, forget_ids, heldout_ids, reference=original, retain=retain_ids, out_dir="audit")
    print(result.passed, result.verdicts)

**Cost** is bounded by ``max_sequences`` (128 per set, a seeded sample) and by the probes and formats chosen. Per
format: one round trip of the weights and MA + EL_n of both sets (EL_n costs most); per relearning trial: three
fine-tunes of a model copy and four scorings of the held-out rows; membership: one forward per set and model.
Progress lines with the ETA go to the ``fastunlearn.evals.audit`` logger (INFO; ``fastunlearn audit`` shows them).
``benchmarks/ops/audit_cost.py`` measures each probe on SmolLM2-135M.
"""

from fastunlearn.evals.audit.config import DEFAULT_FORMATS, PROBES, SLOW_FORMATS, AuditConfig
from fastunlearn.evals.audit.report import AuditOutError
from fastunlearn.evals.audit.run import AuditResult, audit

__all__ = ["DEFAULT_FORMATS", "PROBES", "SLOW_FORMATS", "AuditConfig", "AuditOutError", "AuditResult", "audit"]
