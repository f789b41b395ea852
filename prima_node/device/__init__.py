"""What a device can do for the model: memory, kernel speed, disk and links (the profiler)."""
