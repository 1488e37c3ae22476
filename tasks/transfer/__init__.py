"""Transfer selection: which teacher and how deep to fine-tune, chosen from evidence on the data."""
