"""Beyond one process: Ray Serve (`serve`), Ray Data (`batch-infer`) and Triton model repositories
(`export-triton`), the optional `serve` extra. Ray is imported only by the modules that need it."""
