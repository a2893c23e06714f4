"""Dataset sources: converters from external formats into jaxclip records.

One module per source, each with a `Source` dataclass (see `common.Source`), its command-line
flags (`add_arguments`, `ARG_DESTS`) and `from_args`:

    folder         images + CSV/TSV/JSONL captions (open_clip's --csv-* layout)
    webdataset     LAION/DataComp-style .tar shards
    tfds           a prepared tfds dataset, read without TensorFlow
    fashion_mnist  Debian dataset-fashion-mnist (zero-shot classes in CLASS_NAMES)
    emoji          Debian fonts-noto-color-emoji + unicode-data (CLDR names as captions)
    shapes         the procedural demo set (coloured shapes, compositional captions)

`common` defines the `Source` protocol and the `Skip` marker for bad input items; `checks` holds
the record and image checks the builder applies to every record. `jaxclip.data.build` turns any
source into ArrayRecord shards.
"""

from jaxclip.data.sources import emoji, fashion_mnist, folder, shapes, tfds, webdataset
from jaxclip.data.sources.common import Record, Skip, Source, iter_source_records

# Name on the command line (--source) -> module.
MODULES = {
    "folder": folder,
    "webdataset": webdataset,
    "tfds": tfds,
    "fashion_mnist": fashion_mnist,
    "emoji": emoji,
    "shapes": shapes,
}

__all__ = ["MODULES", "Record", "Skip", "Source", "iter_source_records"]
