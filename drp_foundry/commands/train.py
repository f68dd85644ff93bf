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

Before LLM-Foundry starts: the pre-flight config checks; the lock on a local ``save_folder``
(``drp_foundry/run_lock.py``: a second live run on the folder is refused, naming the first);
then the checks of the checkpoint it resumes from (``drp_foundry/composer/resume_checks.py``).
"""

from __future__ import annotations

import logging
import os
import sys


def _hold_save_folder(yaml_path: str, cfg):
    """One live run per local save_folder (drp_foundry/run_lock.py); global rank 0 holds it."""
    from drp_foundry.run_lock import RunLockError, hold_run_lock, is_remote

    save_folder = cfg.get('save_folder')
    if not save_folder or is_remote(str(save_folder)) or int(os.environ.get('RANK', '0')) != 0:
        return None
    try:
        return hold_run_lock(str(save_folder).format(run_name=cfg.get('run_name', '')))
    except RunLockError as err:
        raise SystemExit(f'refused ({yaml_path}): {err}') from None


def _check_resume(yaml_path: str, cfg) -> None:
    from drp_foundry.composer.config_checks import ConfigError
    from drp_foundry.composer.resume_checks import check_resume_checkpoint

    try:
        check_resume_checkpoint(cfg)
    except ConfigError as err:
        raise SystemExit(f'config error in {yaml_path}: {err}') from None


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
    check_train_config_file(yaml_path, overrides, resume=False)
    cfg = load_train_config(yaml_path, overrides)
    lock = _hold_save_folder(yaml_path, cfg)  # noqa: F841  (held until this process ends)
    try:
        _check_resume(yaml_path, cfg)
    except SystemExit:
        if lock is not None:
            from drp_foundry.run_lock import restore_holder

            restore_holder(lock)  # a refused run leaves save_folder byte for byte as it was
        raise
    level = cfg.get('python_log_level')
    if level:  # LLM-Foundry sets its own loggers' level from this key; ours follow it
        logging.getLogger('drp_foundry').setLevel(str(level).upper())
    train_from_yaml(yaml_path, overrides)
    return 0


if __name__ == '__main__':
    sys.exit(main())
