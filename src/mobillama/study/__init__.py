"""The reproduction study: the paper's central comparisons at a scale a CPU can run."""
