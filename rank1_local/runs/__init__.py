"""Files a user reads and writes: documents and pairs, run files and their headers, atomic writes, user folders."""
