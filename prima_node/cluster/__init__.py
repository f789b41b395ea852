"""The piped ring: nodes that run one model together, each holding only its layer windows."""
