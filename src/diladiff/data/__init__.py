"""Tokenizers, corpus sources and packed token shards."""
