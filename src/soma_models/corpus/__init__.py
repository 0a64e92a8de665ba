"""Corpora of any size: `prepare` turns raw files, JSONL, Parquet and Hugging Face
`datasets` folders into shards of document bytes with an offset index, which `Corpus`
memory-maps (`soma_models.corpus.layout` describes the format and why it is that one).

    from soma_models.corpus import Corpus, prepare
    prepare(["crawl/", "shards/*.parquet"], "corpus/", column="text")
    corpus = Corpus("corpus/")
    corpus.document(0)          # uint8 view of the first document, nothing copied

Framework-free (NumPy; pyarrow and `datasets` only to read inputs), so the torch and the
Flax trainers share it through `soma_models.train.data`.
"""

from soma_models.corpus.layout import Corpus, CorpusError, is_corpus
from soma_models.corpus.prepare import PrepareResult, prepare

__all__ = ["Corpus", "CorpusError", "PrepareResult", "is_corpus", "prepare"]
