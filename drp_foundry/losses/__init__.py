"""Loss terms that are not pruning (ours): logit distillation from the source, unlikelihood against loops.

Pure torch, like ``pruning/``: no Composer or LLM-Foundry import; the Algorithms that add them to a run
are ``composer/distillation.py`` and ``composer/unlikelihood.py``.
"""
