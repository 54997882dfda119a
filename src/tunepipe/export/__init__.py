"""Export: merge the trained adapters into the base and write a model ready to serve (the merge stage).

Entry point `merge.run_export` (`tunepipe export`): adapters merged in order, the weights written as
sharded safetensors with their index (`shards`), tokenizer and generation config beside them, an
Ollama `Modelfile` (`modelfile`), and the merged logits checked against base + adapter.
"""
