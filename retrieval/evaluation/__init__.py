"""How good it is, measured on the user's data: retrieval quality of an index (precision@k,
mAP, recall of approximate kinds) and the accuracy of a checkpoint's classifier."""
