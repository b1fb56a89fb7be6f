"""Image files in: walk a collection, open one file safely (EXIF, any mode) or say why not."""
