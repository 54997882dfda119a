"""Data: raw files in, validated rows and tokenized Arrow shards out (the validate and tokenize stages).

validate (entry point `validate.run_validate`): `registry` reads dataset_info.json, `readers` the
raw files, `formats` turns alpaca / sharegpt / preference / KTO / text rows into canonical rows,
`schemas` + `row_checks` reject bad rows with their file and row, `validated` writes the result.

tokenize (entry point `tokenize.run_tokenize`): `templates` + `chat_format` render conversations,
`encoding` + `prefix_ids` turn them into input ids with masked labels, `mixing` samples and mixes
datasets, `batching` + `packing` group samples, and the shards are written for `load_from_disk`.
"""
