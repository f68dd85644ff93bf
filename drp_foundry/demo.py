"""``python -m drp_foundry.demo``: the CPU demo (the logic is ``drp_foundry/commands/demo.py``)."""

import sys

from drp_foundry.commands.demo import main

if __name__ == '__main__':
    sys.exit(main())
