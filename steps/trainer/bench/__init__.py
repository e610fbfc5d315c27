"""Is the trainer fast? `python -m steps.bench`: on the CPU (`cpu`), this trainer against a
minimal loop and Hugging Face `Trainer`; on a GPU (`gpu`), at real shapes, with and without the
fast paths. `common` is what both share; `cli` the command line."""
