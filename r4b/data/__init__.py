"""r4b.data: training and evaluation data for auto-thinking MLLMs.

JSONL samples (:mod:`~r4b.data.schema`) and VLMEvalKit TSVs (:mod:`~r4b.data.tsv`) are read with every
problem located by file, line and field (:class:`DataError`); samples are tokenized with R-4B's template
and loss mask (:mod:`~r4b.data.encode`) and packed under a token budget (:mod:`~r4b.data.pack`; which samples share a
global batch and a rank is the trainer's plan, r4b.train.batches). Nothing is dropped without being
counted in a :class:`DataReport`.
"""

from r4b.data.encode import IGNORE_INDEX, EncodedSample, encode_sample, encode_samples, render_segments
from r4b.data.errors import DataError
from r4b.data.image import ImageProcessor, image_sizes, image_token_counts, load_images
from r4b.data.pack import collate_packed, pack
from r4b.data.report import DataReport
from r4b.data.schema import SAMPLE_MODES, Sample, check_prompt, parse_sample, read_jsonl, read_prompts
from r4b.data.tsv import EvalSample, read_vlmeval_tsv

__all__ = [
    "IGNORE_INDEX",
    "SAMPLE_MODES",
    "DataError",
    "DataReport",
    "EncodedSample",
    "EvalSample",
    "ImageProcessor",
    "Sample",
    "check_prompt",
    "collate_packed",
    "encode_sample",
    "encode_samples",
    "image_sizes",
    "image_token_counts",
    "load_images",
    "pack",
    "parse_sample",
    "read_jsonl",
    "read_prompts",
    "read_vlmeval_tsv",
    "render_segments",
]
