"""Train with LLM-Foundry's own train entry, after drp-foundry's config checks.

Same command line as LLM-Foundry's ``scripts/train/train.py``::

    composer -m drp_foundry.commands.train CONFIG.yaml [key=value ...]   # multi-GPU / multi-node launcher
    composer train.py CONFIG.yaml [key=value ...]                        # the same, from a checkout
    drp-train CONFIG.yaml [key=value ...]                                # one process, e.g. on CPU

drp-foundry's components are found through LLM-Foundry's registries (entry points of the
installed ``drp-foundry`` distribution); nothing here registers them.

Under ``FSDP_VERSION=2`` the run gets the ``drp_fsdp2_gloo_average`` callback (unless the config
names it already): on gloo (CPU ranks) FSDP2 sums gradients instead of averaging them, and the callback
makes it average; on NCCL it does nothing (``drp_foundry/composer/fsdp2_gloo.py``).
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__)
        return 0 if argv else 2
    from llmfoundry.command_utils import train_from_yaml

    from drp_foundry.composer.config_checks import check_train_config_file, load_train_config
    from drp_foundry.composer.harmless_warnings import filter_harmless_warnings

    filter_harmless_warnings()

    yaml_path, overrides = argv[0], argv[1:]
    if os.environ.get('FSDP_VERSION') == '2':  # merged into the config's callbacks (a no-op if it names it)
        overrides.append('callbacks.drp_fsdp2_gloo_average={}')
    check_train_config_file(yaml_path, overrides)
    level = load_train_config(yaml_path, overrides).get('python_log_level')
    if level:  # LLM-Foundry sets its own loggers' level from this key; ours follow it
        logging.getLogger('drp_foundry').setLevel(str(level).upper())
    train_from_yaml(yaml_path, overrides)
    return 0


if __name__ == '__main__':
    sys.exit(main())
