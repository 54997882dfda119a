"""Validated rows -> tokenized Arrow shards: encoding, batching, packing, mixing, writing."""
