"""``fastunlearn demo``: the offline demo on a tiny model, or ``--real`` on SmolLM2-135M-Instruct
(``fastunlearn.demo``)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: a tiny model memorizes data, then FILA + IHL unlearns it")
    p.add_argument("--seed", type=int, default=0, help="seed for data, model and unlearning (default 0)")
    p.add_argument("--out", help="output directory (./fastunlearn-demo, with --real ./fastunlearn-demo-real); a "
                   "previous demo output there is replaced")  # fmt: skip
    p.add_argument("--real", action="store_true",
                   help="the same story on a real pretrained model: SmolLM2-135M-Instruct (a Q4_1 GGUF, "
                   "dequantized; 93 MB downloaded once) is fine-tuned to memorize the records, then unlearns 12; "
                   "minutes on a CPU")  # fmt: skip
    p.add_argument("--cache-dir", help="where the memorized model is cached ($FASTUNLEARN_CACHE_DIR, else "
                   "~/.cache/fastunlearn)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.real:
        from fastunlearn.demo.real import RealDemoConfig
        from fastunlearn.demo.real import main as real_main

        return real_main(RealDemoConfig(seed=args.seed, out_dir=args.out or "fastunlearn-demo-real",
                                        cache_dir=args.cache_dir))  # fmt: skip
    from fastunlearn.demo.toy import DemoConfig, main

    return main(DemoConfig(seed=args.seed, out_dir=args.out or "fastunlearn-demo", cache_dir=args.cache_dir))
