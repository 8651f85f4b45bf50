"""Target device profiles (data files in ``profiles/``)."""
