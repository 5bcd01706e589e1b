"""Data shipped with the package: `tinyshakespeare.txt`, the first 1 MB of Karpathy's tinyshakespeare
(public-domain Shakespeare), cut at a line boundary. Load it with `hf_fastattn.showcase.tinylm.load_corpus()`."""
