"""The commands, one module each (``main(argv) -> exit status``); console_scripts and ``python -m`` point here.

The entry scripts elsewhere (``train.py``, ``python -m drp_foundry.demo``, ...) only call these.
"""
