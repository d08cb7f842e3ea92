"""Data: text corpora and JSONL rows in, token shards and numbered training batches out."""
