"""What only the CPU demo uses: its stages (``pipeline.py``), recipes (``recipes/``), the embedded
seven-domain corpus (``corpus/``), the SmolLM2 bootstrap (``smollm2.py``) and its progress display
(``progress.py``).

Nothing in ``drp_foundry`` imports this package but its commands (``commands/demo.py``,
``commands/smollm2.py``); ``tests/test_import_graph.py`` holds that.
"""
