"""DeepSpeed ZeRO checkpoints resumed on another number of ranks, through DeepSpeed's universal checkpoint.

ZeRO partitions the fp32 master weights and AdamW's moments by rank, so its own loader needs the writer's rank
count. DeepSpeed's ``ds_to_universal`` rewrites a checkpoint as one file per parameter and state, and
``load_checkpoint`` with ``load_universal_checkpoint`` set partitions those for the ranks at hand. Rank 0 converts
into a sibling of the checkpoint (``.checkpoint-<step>.universal``, on the filesystem every rank reads), every rank
loads it, rank 0 removes it; the checkpoint itself is never written to, so its checksums stay valid.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from r4b.train.integrity import together
from r4b.train.ranks import barrier, rank

ZERO_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")  # one per data-parallel rank
TAG = "engine"  # the tag r4b's DeepSpeed engine saves under


def ranks_written(path: str | Path) -> int:
    """How many data-parallel ranks wrote the DeepSpeed checkpoint directory ``path`` (0: none found)."""
    tag = Path(path) / TAG
    files = os.listdir(tag) if tag.is_dir() else []
    return len({m.group(1) for name in files if (m := ZERO_RANK_FILE.search(name))})


@contextlib.contextmanager
def universal_copy(path: str | Path) -> Iterator[str]:
    """The universal form of the DeepSpeed checkpoint directory ``path`` (collective), removed afterwards: a
    directory that holds it under :data:`TAG`, for ``load_checkpoint(dir, tag=TAG)``."""
    checkpoint = Path(path).parent  # run_dir/checkpoint-<step>; path is its engine/
    out = checkpoint.parent / f".{checkpoint.name}.universal"
    together(lambda: _convert(Path(path) / TAG, out / TAG) if rank() == 0 else None)
    try:
        yield str(out)
    finally:
        barrier()
        if rank() == 0:
            shutil.rmtree(out, ignore_errors=True)


def _convert(source: Path, target: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(target.parent, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,  # in this process: no pool of workers beside the training ranks
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # in memory: r4b's checkpoints carry no Megatron layout info, none is needed
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        ds_to_universal.main(args)
