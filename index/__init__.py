"""Per-category FAISS index artifacts: offline build, atomic publish, incremental edits, the service loader."""
