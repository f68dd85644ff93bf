"""``composer train.py CONFIG.yaml [key=value ...]``: the checkout's train script, LLM-Foundry's command line.

An installed drp-foundry has the same entry as ``drp-train`` (or
``composer -m drp_foundry.commands.train``); the logic is ``drp_foundry/commands/train.py``.
"""

import sys

from drp_foundry.commands.train import main

if __name__ == '__main__':
    sys.exit(main())
