"""``python -m drp_foundry.train CONFIG.yaml [key=value ...]`` (or ``composer -m drp_foundry.train ...``).

The train entry of an installed drp-foundry; the logic is ``drp_foundry/commands/train.py``.
"""

import sys

from drp_foundry.commands.train import main

if __name__ == '__main__':
    sys.exit(main())
