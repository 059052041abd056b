"""Token data stage: documents → tokenizer → packed ``seq_len + 1`` samples → webdataset shards."""
