"""The fixed data layer: dataset sources, tokenizer training, downloads and the builder
behind `arun prepare`. The runtime half that train files read lives in prepare.py."""

# Datasets whose val/test text the train process can read, so it can rebuild those rows and bake them
# into its forward: their numbers are not held-out numbers, and every record and view on them says so.
# pystdlib is the interpreter's own standard-library source: every Python process must be able to read it.
NOT_HELD_OUT = {"pystdlib": "its val/test text is the interpreter's own standard library, readable by the train process"}


def held_out(dataset: str | None) -> bool:
    """Whether the train process cannot read a dataset's val/test text (a property of its source)."""
    return str(dataset) not in NOT_HELD_OUT


def not_held_out(record: dict | None) -> bool:
    """A record scored on a dataset whose held-out text is readable (its own mark, or its key's dataset
    for records written before the mark existed)."""
    if not record:
        return False
    return record.get("held_out") is False or not held_out((record.get("key") or {}).get("dataset"))
