"""Which files of an output folder drp-export / drp-prune-oneshot wrote, so ``--overwrite`` replaces only those.

Both tools record the list in their ``pruning_report.json`` (``written_files``, relative paths)
as the last step of the staging folder. ``--overwrite`` of a folder that also holds anything
else (a ``domain_losses.json``, ``eval/notes.md`` a user added) is refused with the list: the
choice here is to refuse rather than to carry the files over, because a carried-over file (an
eval of the previous model) would then describe a model it was not made from. An export written
before the list existed is judged by the names an export writes (``EXPORT_NAMES``).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

__all__ = ['WRITTEN_KEY', 'record_written_files', 'foreign_files']

WRITTEN_KEY = 'written_files'
# what save_pretrained (model + tokenizer), the report and the model card write
EXPORT_NAMES = ('config.json', 'generation_config.json', 'model*.safetensors', 'model.safetensors.index.json',
                'pytorch_model*.bin', 'tokenizer*', 'special_tokens_map.json', 'vocab.json', 'merges.txt',
                'added_tokens.json', 'chat_template.*', 'pruning_report.json', 'README.md', 'model_card.json')


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file() or p.is_symlink())


def record_written_files(staging: Path, report_name: str) -> None:
    """Add the list of every file in ``staging`` to its report (call when nothing else will be written)."""
    report_path = staging / report_name
    record = json.loads(report_path.read_text())
    record[WRITTEN_KEY] = _files(staging)
    report_path.write_text(json.dumps(record, indent=2))


def foreign_files(out_dir: Path, report_name: str) -> list[str]:
    """Files in ``out_dir`` that the earlier export (its report) did not write."""
    try:
        written = json.loads((out_dir / report_name).read_text()).get(WRITTEN_KEY)
    except (OSError, ValueError, AttributeError):
        written = None
    present = _files(out_dir)
    if isinstance(written, list):
        return [name for name in present if name not in set(written)]
    return [name for name in present if '/' in name or not any(fnmatch.fnmatch(name, p) for p in EXPORT_NAMES)]
