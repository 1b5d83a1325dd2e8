"""Data: synthetic shards, tokenizer, image transforms and webdataset loaders."""
