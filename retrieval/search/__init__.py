"""The library's one object, :class:`~retrieval.search.index.Index`: an index opened once, its
searcher and (from the first image it embeds) its model, answering many calls."""

from retrieval.search.index import Index

__all__ = ["Index"]
