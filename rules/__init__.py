"""The rule tables, as data (generated from the standard by generate.py, plus policy files)."""
