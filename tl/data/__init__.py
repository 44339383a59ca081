"""Data: the embedded digits suite, user sources, the episode sampler, one table schema."""

from tl.data.episodes import Episode, sample_episodes
from tl.data.imageset import ImageSet
from tl.data.parquet import load_parquet
from tl.data.sources import load_csv_manifest, load_image_folder, load_source
from tl.data.suite import load_embedded

__all__ = [
    "Episode", "ImageSet", "sample_episodes", "load_embedded",
    "load_image_folder", "load_csv_manifest", "load_parquet", "load_source",
]
