"""The fixed data layer: dataset sources, tokenizer training, downloads and the builder
behind `arun prepare`. The runtime half that train files read lives in prepare.py."""
