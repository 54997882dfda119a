"""Data: raw files in, validated rows and tokenized Arrow shards out (the validate and tokenize stages).

validate (entry point `validate.run_validate`): `registry` reads dataset_info.json, `readers` the
raw files, `formats` turns alpaca / sharegpt / preference / KTO / text rows into canonical rows,
`schemas` + `row_checks` reject bad rows with their file and row, `validated` writes the result.

tokenize (entry point `tokenize.run_tokenize`): `templates` turns a conversation into turns (by
`named_templates` + `tool_formats`, LLaMA-Factory's template names, or the tokenizer's own jinja),
`encoding` tokenizes each turn alone and masks the labels, `chat_format` describes a template from
outside (end-of-turn token, per-role parts for the Modelfile), `mixing` samples and mixes
datasets, `batching` + `packing` group samples, and the shards are written for `load_from_disk`.
"""
