"""The whole collection at once, from the vectors an index already holds: pairs of vectors
within a distance (near.py, which the duplicates tiers build on), k-means clusters, a 2-D map,
and fc7 exported as shards. Each tool reads an open :class:`retrieval.Index` in blocks, so none
needs every vector in memory."""
