"""A folder against an index: plan what changed, extract it into staged chunks, commit."""
