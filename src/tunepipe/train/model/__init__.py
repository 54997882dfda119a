"""The model a trainer trains: loading, adapters, vocabulary, MoE, vision parts."""
