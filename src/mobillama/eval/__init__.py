"""Evaluation: the lm-eval model (``harness``), offline benchmark suites (``suites``, ``data``, ``tasks/``),
perplexity on prepared shards (``perplexity``), bootstrap statistics (``stats``) and reports (``report``).

Importing ``mobillama.eval.harness`` registers the ``mobillama`` model type with lm-evaluation-harness;
this package itself imports nothing heavy, so the CLI stays fast.
"""
