"""Stage 3 (docs/design.md, "Stage 3"): `selfaug eval`, the base model against fine-tuned ones.

  evaluate.py       the command: RAG accuracy (plain and strict), IFEval, drift; report.json
  ifeval.py         IFEval scoring with lm-eval's checkers, offline; ifeval_dev.jsonl, the bundled prompts
  plots.py          the PNG plots of a report, of runs' metrics and of a study
  study.py          `selfaug study`: every arm under several seeds, one evaluation (docs/design.md,
                    "Studies over seeds")
  stats.py          a study's statistics: mean, sd, paired bootstrap intervals
"""
